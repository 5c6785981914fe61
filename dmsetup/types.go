package dmsetup

import (
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// SectorSize is the unit, in bytes, of every device-mapper length and
// offset.
const SectorSize = 512

// Sectors is a length or offset in SectorSize units.
type Sectors uint64

// BytesToSectors converts a size in bytes, rounding down to whole sectors.
func BytesToSectors(n uint64) Sectors { return Sectors(n / SectorSize) }

// Bytes is s in bytes.
func (s Sectors) Bytes() uint64 { return uint64(s) * SectorSize }

// Version is a three-part version of the dm ioctl interface or of a target.
type Version struct {
	Major, Minor, Patch uint32
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// Device is one entry of List.
type Device struct {
	Name         string
	Major, Minor uint32
	// EventNr and UUID are reported by newer kernels only (4.14 and 5.13);
	// they are zero and empty otherwise.
	EventNr uint32
	UUID    string
}

// Info is the state of one device (DM_DEV_STATUS).
type Info struct {
	Name, UUID     string
	Major, Minor   uint32
	OpenCount      int32
	EventNr        uint32
	TargetCount    uint32 // targets in the live table
	Suspended      bool
	ReadOnly       bool
	LiveTable      bool
	InactiveTable  bool
	DeferredRemove bool
}

// Target is one line of a device table: Length sectors starting at Start
// mapped by target Type with parameters Params.
type Target struct {
	Start, Length Sectors
	Type          string
	Params        string
}

// String formats t as a dmsetup table line.
func (t Target) String() string {
	return fmt.Sprintf("%d %d %s %s", t.Start, t.Length, t.Type, t.Params)
}

// validate refuses a target the kernel would refuse or that would not
// encode: a bad type name, a zero length or a NUL in the parameters.
func (t Target) validate() error {
	if t.Type == "" || len(t.Type) >= maxTypeNameLen || strings.ContainsAny(t.Type, " \t\n\x00") {
		return fmt.Errorf("invalid target type %q: %w", t.Type, unix.EINVAL)
	}
	if t.Length == 0 {
		return fmt.Errorf("target %s has zero length: %w", t.Type, unix.EINVAL)
	}
	if strings.ContainsRune(t.Params, 0) {
		return fmt.Errorf("target %s parameters contain NUL: %w", t.Type, unix.EINVAL)
	}
	return nil
}

// targetStatus is the status line of one target of the live table.
type targetStatus struct {
	Start, Length Sectors
	Type          string
	Status        string
}

// targetVersion is a target type registered in the kernel.
type targetVersion struct {
	Name    string
	Version Version
}

// CreateOptions are the options of Client.Create.
type CreateOptions struct {
	UUID     string
	ReadOnly bool
}

// SuspendOptions are the options of Client.Suspend.
type SuspendOptions struct {
	// NoFlush leaves in-flight I/O queued instead of flushing it.
	NoFlush bool
	// SkipLockfs does not freeze a filesystem mounted on the device.
	SkipLockfs bool
}

// RemoveOptions are the options of Client.Remove.
type RemoveOptions struct {
	// Deferred asks the kernel to remove an open device on its last close
	// instead of failing with EBUSY.
	Deferred bool
	// Retries is how many times EBUSY is retried: 0 means the default of
	// 10, negative means no retry.
	Retries int
	// Delay is the wait between retries; 0 means the default of 50ms.
	Delay time.Duration
}

// Defaults of RemoveOptions: a busy device is retried for about half a
// second.
const (
	defaultRemoveRetries = 10
	defaultRemoveDelay   = 50 * time.Millisecond
)
