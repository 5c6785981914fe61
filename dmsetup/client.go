//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	controlPath    = "/dev/mapper/control"
	controlDevFile = "/sys/class/misc/device-mapper/dev"
	udevControl    = "/run/udev/control"
	defaultDevDir  = "/dev/mapper"
)

// udevMode says whether udev manages /dev/mapper nodes.
type udevMode int

const (
	// udevAuto treats udev as running when /run/udev/control exists.
	udevAuto udevMode = iota
	// udevOn assumes udev creates and removes the nodes.
	udevOn
	// udevOff makes the client create and remove the nodes itself.
	udevOff
)

// Option configures Open.
type Option func(*Client)

// withUdev sets how device nodes are managed.
func withUdev(mode udevMode) Option { return func(c *Client) { c.udevMode = mode } }

// WithUdevFlags sets the udev flags every resume (including Create's) and
// remove of this client passes to the udev rules; 0 (the default) passes
// none.
func WithUdevFlags(f UdevFlags) Option { return func(c *Client) { c.udevFlags = f } }

// withDevDir sets the directory of device nodes (default /dev/mapper).
func withDevDir(dir string) Option { return func(c *Client) { c.devDir = dir } }

// Client talks to the device-mapper driver. It is safe for concurrent use:
// every call builds its own ioctl buffer.
type Client struct {
	// mu is held for reading by every ioctl and for writing by Close, so
	// the control file is never closed under a call.
	mu       sync.RWMutex
	fd       int
	udevMode udevMode
	udev     bool
	devDir   string

	udevFlags UdevFlags
}

// Open opens /dev/mapper/control, creating the node from
// /sys/class/misc/device-mapper/dev if it is missing.
func Open(opts ...Option) (*Client, error) {
	c := &Client{fd: -1, udevMode: udevAuto, devDir: defaultDevDir}
	for _, o := range opts {
		o(c)
	}
	switch c.udevMode {
	case udevOn:
		c.udev = true
	case udevOff:
		c.udev = false
	default:
		_, err := os.Stat(udevControl)
		c.udev = err == nil
	}
	fd, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		if err = makeControlNode(); err == nil {
			fd, err = unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return nil, opError("open", controlPath, err)
	}
	c.fd = fd
	return c, nil
}

// makeControlNode creates /dev/mapper/control when the driver is loaded but
// nothing created its node (no udev, devtmpfs names it differently).
func makeControlNode() error {
	b, err := os.ReadFile(controlDevFile)
	if err != nil {
		if os.IsNotExist(err) {
			return fmt.Errorf("device-mapper is not available in this kernel (%s missing): %w", controlDevFile, unix.ENOENT)
		}
		return err
	}
	major, minor, err := parseMajorMinor(strings.TrimSpace(string(b)))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(controlPath), 0o755); err != nil {
		return err
	}
	err = unix.Mknod(controlPath, unix.S_IFCHR|0o600, int(unix.Mkdev(major, minor)))
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// Close closes the control device.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// DevicePath is the node of device name: <devdir>/<name>.
func (c *Client) DevicePath(name string) string { return filepath.Join(c.devDir, name) }

// ioctl runs one command with req as argument.
func (c *Client) ioctl(cmd uintptr, req *request) (reply, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.fd < 0 {
		return reply{}, unix.EBADF
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), cmd, uintptr(unsafe.Pointer(&req.buf[0])))
	if errno != 0 {
		return reply{}, errno
	}
	return reply{buf: req.buf}, nil
}

// query runs an idempotent command whose reply carries data, growing the
// buffer while the kernel reports it full.
func (c *Client) query(cmd uintptr, name string, flags uint32) (reply, error) {
	size := defaultDataSize
	for {
		req, err := newRequest(name, flags, size)
		if err != nil {
			return reply{}, err
		}
		rep, err := c.ioctl(cmd, req)
		if err != nil {
			return reply{}, err
		}
		if rep.flags()&unix.DM_BUFFER_FULL_FLAG == 0 {
			return rep, nil
		}
		if size >= maxDataSize {
			return reply{}, fmt.Errorf("reply larger than %d bytes: %w", maxDataSize, unix.ENOBUFS)
		}
		size *= 2
	}
}

// queryData runs query on device name ("" for a call about no device) and
// returns the reply and the data in it. Its errors name op and the device.
func (c *Client) queryData(cmd uintptr, op, name string, flags uint32) (reply, []byte, error) {
	rep, err := c.query(cmd, name, flags)
	if err != nil {
		return reply{}, nil, opError(op, name, err)
	}
	data, err := rep.payload()
	if err != nil {
		return reply{}, nil, opError(op, name, err)
	}
	return rep, data, nil
}

// checkName rejects names the kernel would refuse or that would escape the
// device node directory.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) >= nameLen ||
		strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("invalid device name %q: %w", name, unix.EINVAL)
	}
	return nil
}

// List returns all dm devices.
func (c *Client) List() ([]Device, error) {
	_, data, err := c.queryData(unix.DM_LIST_DEVICES, "list", "", unix.DM_UUID_FLAG)
	if err != nil {
		return nil, err
	}
	devs, err := decodeNameList(data)
	return devs, opError("list", "", err)
}

// Info returns the state of device name; ENXIO if it does not exist.
func (c *Client) Info(name string) (Info, error) {
	if err := checkName(name); err != nil {
		return Info{}, opError("info", name, err)
	}
	req, err := newRequest(name, 0, 0)
	if err != nil {
		return Info{}, opError("info", name, err)
	}
	rep, err := c.ioctl(unix.DM_DEV_STATUS, req)
	if err != nil {
		return Info{}, opError("info", name, err)
	}
	return rep.info(), nil
}

// Create creates device name with the given table and activates it. If the
// table cannot be loaded or resumed the half-made device is removed.
func (c *Client) Create(name string, targets []Target, opts CreateOptions) error {
	if err := checkName(name); err != nil {
		return opError(opCreate, name, err)
	}
	table, err := encodeTargets(targets)
	if err != nil {
		return opError(opCreate, name, err)
	}
	req, err := newRequest(name, 0, 0)
	if err == nil {
		err = req.setUUID(opts.UUID)
	}
	if err != nil {
		return opError(opCreate, name, err)
	}
	if _, err := c.ioctl(unix.DM_DEV_CREATE, req); err != nil {
		return opError(opCreate, name, err)
	}
	if err := c.load(name, table, uint32(len(targets)), opts.ReadOnly); err != nil {
		return errors.Join(err, c.removeHalfMade(name))
	}
	if err := c.Resume(name); err != nil {
		return errors.Join(err, c.removeHalfMade(name))
	}
	return nil
}

// removeHalfMade removes a device that Create made but could not load or
// resume, so that a failed Create leaves nothing behind.
func (c *Client) removeHalfMade(name string) error {
	req, err := newRequest(name, 0, 0)
	if err != nil {
		return err
	}
	if _, err := c.ioctl(unix.DM_DEV_REMOVE, req); err != nil {
		return opError("remove after failed create", name, err)
	}
	return c.removeNode(name)
}

// Load loads a table into the inactive slot of device name; Resume makes it
// live.
func (c *Client) Load(name string, targets []Target, readOnly bool) error {
	if err := checkName(name); err != nil {
		return opError("table load", name, err)
	}
	table, err := encodeTargets(targets)
	if err != nil {
		return opError("table load", name, err)
	}
	return c.load(name, table, uint32(len(targets)), readOnly)
}

// load is Load with the table already encoded, as Create needs it too.
func (c *Client) load(name string, table []byte, count uint32, readOnly bool) error {
	var flags uint32
	if readOnly {
		flags |= unix.DM_READONLY_FLAG
	}
	req, err := newRequest(name, flags, len(table))
	if err != nil {
		return opError("table load", name, err)
	}
	copy(req.data(), table)
	req.setTargetCount(count)
	if _, err := c.ioctl(unix.DM_TABLE_LOAD, req); err != nil {
		return opError("table load", name, err)
	}
	return nil
}

// Reload replaces the table of active device name: the new table is loaded
// into the inactive slot, then the device is suspended (flushing its I/O)
// and resumed with it. A failed suspend drops the loaded table again.
func (c *Client) Reload(name string, targets []Target) error {
	if err := c.Load(name, targets, false); err != nil {
		return err
	}
	if err := c.Suspend(name, SuspendOptions{}); err != nil {
		return errors.Join(err, c.ClearTable(name))
	}
	return c.Resume(name)
}

// ClearTable drops the inactive table of device name.
func (c *Client) ClearTable(name string) error {
	return c.simple(unix.DM_TABLE_CLEAR, "table clear", name, 0)
}

// Suspend suspends device name.
func (c *Client) Suspend(name string, opts SuspendOptions) error {
	flags := uint32(unix.DM_SUSPEND_FLAG)
	if opts.NoFlush {
		flags |= unix.DM_NOFLUSH_FLAG
	}
	if opts.SkipLockfs {
		flags |= unix.DM_SKIP_LOCKFS_FLAG
	}
	return c.simple(unix.DM_DEV_SUSPEND, "suspend", name, flags)
}

// Resume resumes device name, swapping in its inactive table if it has one,
// and makes sure its device node exists.
func (c *Client) Resume(name string) error {
	if err := checkName(name); err != nil {
		return opError("resume", name, err)
	}
	req, err := newRequest(name, 0, 0)
	if err != nil {
		return opError("resume", name, err)
	}
	req.setEventNr(c.udevFlags.cookie())
	rep, err := c.ioctl(unix.DM_DEV_SUSPEND, req)
	if err != nil {
		return opError("resume", name, err)
	}
	dev := rep.dev()
	if err := c.ensureNode(name, unix.Major(dev), unix.Minor(dev)); err != nil {
		return opError("resume", name, fmt.Errorf("device node: %w", err))
	}
	return nil
}

// simple runs a command that takes only a device name and flags and
// returns nothing.
func (c *Client) simple(cmd uintptr, op, name string, flags uint32) error {
	if err := checkName(name); err != nil {
		return opError(op, name, err)
	}
	req, err := newRequest(name, flags, 0)
	if err != nil {
		return opError(op, name, err)
	}
	if _, err := c.ioctl(cmd, req); err != nil {
		return opError(op, name, err)
	}
	return nil
}

// Remove removes device name and its node, retrying while it is busy. With
// opts.Deferred an open device is removed by the kernel on its last close.
func (c *Client) Remove(ctx context.Context, name string, opts RemoveOptions) error {
	if err := checkName(name); err != nil {
		return opError("remove", name, err)
	}
	retries, delay := opts.Retries, opts.Delay
	if retries == 0 {
		retries = defaultRemoveRetries
	}
	if delay <= 0 {
		delay = defaultRemoveDelay
	}
	var flags uint32
	if opts.Deferred {
		flags |= unix.DM_DEFERRED_REMOVE
	}
	for attempt := 0; ; attempt++ {
		req, err := newRequest(name, flags, 0)
		if err != nil {
			return opError("remove", name, err)
		}
		req.setEventNr(c.udevFlags.cookie())
		rep, err := c.ioctl(unix.DM_DEV_REMOVE, req)
		if err == nil {
			if opts.Deferred && rep.flags()&unix.DM_DEFERRED_REMOVE != 0 {
				// The device is still open: the kernel removes it on its
				// last close. Its node stays behind, stale, until the name
				// is used again.
				return nil
			}
			if err := c.removeNode(name); err != nil {
				return opError("remove", name, fmt.Errorf("device node: %w", err))
			}
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || attempt >= retries {
			return opError("remove", name, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return opError("remove", name, errors.Join(err, ctx.Err()))
		case <-t.C:
		}
	}
}

// message sends msg to the target at sector of device name and returns the
// text the target answered, if any. A message is not idempotent, so a reply
// too large for the buffer is reported (ENOBUFS) rather than retried.
func (c *Client) message(name string, sector uint64, msg string) (string, error) {
	op := "message " + strconv.Quote(msg)
	if err := checkName(name); err != nil {
		return "", opError(op, name, err)
	}
	data := encodeMessage(sector, msg)
	req, err := newRequest(name, 0, len(data)+4096)
	if err != nil {
		return "", opError(op, name, err)
	}
	copy(req.data(), data)
	rep, err := c.ioctl(unix.DM_TARGET_MSG, req)
	if err != nil {
		return "", opError(op, name, err)
	}
	fl := rep.flags()
	if fl&unix.DM_BUFFER_FULL_FLAG != 0 {
		return "", opError(op, name, fmt.Errorf("message was delivered but its reply did not fit: %w", unix.ENOBUFS))
	}
	if fl&unix.DM_DATA_OUT_FLAG == 0 {
		return "", nil
	}
	out, err := rep.payload()
	if err != nil {
		return "", opError(op, name, err)
	}
	return cString(out), nil
}

// status returns the status line of each target of the live table of
// device name. flags are the ioctl's, e.g. DM_NOFLUSH_FLAG to spare a thin
// pool its metadata commit.
func (c *Client) status(name string, flags uint32) ([]targetStatus, error) {
	ts, err := c.tableStatus("status", name, flags)
	if err != nil {
		return nil, err
	}
	out := make([]targetStatus, len(ts))
	for i, t := range ts {
		out[i] = targetStatus{Start: t.Start, Length: t.Length, Type: t.Type, Status: t.Params}
	}
	return out, nil
}

// Table returns the live table of device name.
func (c *Client) Table(name string) ([]Target, error) {
	return c.tableStatus("table", name, unix.DM_STATUS_TABLE_FLAG)
}

// tableStatus runs TABLE_STATUS, which returns the table or the status
// lines depending on flags; op names the call in errors.
func (c *Client) tableStatus(op, name string, flags uint32) ([]Target, error) {
	if err := checkName(name); err != nil {
		return nil, opError(op, name, err)
	}
	rep, data, err := c.queryData(unix.DM_TABLE_STATUS, op, name, flags)
	if err != nil {
		return nil, err
	}
	ts, err := decodeTargets(data, rep.targetCount())
	if err != nil {
		return nil, opError(op, name, err)
	}
	return ts, nil
}

// targetVersions lists the target types the kernel has loaded.
func (c *Client) targetVersions() ([]targetVersion, error) {
	_, data, err := c.queryData(unix.DM_LIST_VERSIONS, "list versions", "", 0)
	if err != nil {
		return nil, err
	}
	tv, err := decodeTargetVersions(data)
	return tv, opError("list versions", "", err)
}

// TargetVersion returns the version of one target type, asking the kernel
// to load its module if needed; the kernel answers EINVAL for an unknown
// target.
func (c *Client) TargetVersion(target string) (Version, error) {
	op := "target version " + target
	if len(target) >= nameLen || target == "" {
		return Version{}, opError(op, "", unix.EINVAL)
	}
	rep, err := c.query(unix.DM_GET_TARGET_VERSION, target, 0)
	if errors.Is(err, unix.ENOTTY) {
		// Kernels before 5.4 lack GET_TARGET_VERSION; the full list
		// only shows targets that are already loaded.
		tvs, lerr := c.targetVersions()
		if lerr != nil {
			return Version{}, lerr
		}
		for _, tv := range tvs {
			if tv.Name == target {
				return tv.Version, nil
			}
		}
		return Version{}, opError(op, "", unix.EINVAL)
	}
	if err != nil {
		return Version{}, opError(op, "", err)
	}
	data, err := rep.payload()
	if err != nil {
		return Version{}, opError(op, "", err)
	}
	tv, err := decodeTargetVersions(data)
	if err != nil {
		return Version{}, opError(op, "", err)
	}
	if len(tv) != 1 || tv[0].Name != target {
		return Version{}, opError(op, "", fmt.Errorf("unexpected reply %v: %w", tv, ErrMalformed))
	}
	return tv[0].Version, nil
}
