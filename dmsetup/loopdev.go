//go:build linux

package dmsetup

// LoopDevice is a loop device bound to a file with autoclear set, held
// open until Close. Once closed, whatever still holds it (a mounted
// filesystem, a dm table) keeps it; it clears itself when they let go.
type LoopDevice struct {
	// Path is the device node, e.g. /dev/loop3.
	Path         string
	Major, Minor uint32

	d *loopDev
}

// AttachLoop binds file to a free loop device, as the loop pool binds its
// files.
func AttachLoop(file string) (*LoopDevice, error) {
	d, err := attachLoop(file)
	if err != nil {
		return nil, err
	}
	return &LoopDevice{Path: d.path, Major: d.major, Minor: d.minor, d: d}, nil
}

// Close drops this process's hold on the device.
func (l *LoopDevice) Close() { l.d.close() }

// LoopBacking returns the node and the backing file of loop device
// major:minor; both are empty when it is not a bound loop device.
func LoopBacking(major, minor uint32) (dev, file string) {
	return loopBacking(MajorMinor(major, minor))
}

// RefreshLoopCapacity makes loop device path take the current size of its
// backing file, e.g. after the file grew.
func RefreshLoopCapacity(path string) error { return refreshLoopCapacity(path) }
