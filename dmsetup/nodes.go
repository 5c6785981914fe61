//go:build linux

package dmsetup

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// ensureNode makes <devdir>/<name> a block device node for major:minor.
// With udev running, an existing symlink (udev's) is left alone and a
// missing entry becomes the same symlink udev would make (to /dev/dm-<minor>,
// which devtmpfs creates synchronously), so callers never wait for udev and
// udev can still replace it atomically.
func (c *Client) ensureNode(name string, major, minor uint32) error {
	path := c.DevicePath(name)
	want := unix.Mkdev(major, minor)
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	switch {
	case err == nil:
		if st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == want {
			return nil
		}
		if c.udev && st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return nil
		}
	case !errors.Is(err, unix.ENOENT):
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	if err := os.MkdirAll(c.devDir, 0o755); err != nil {
		return err
	}
	// Create under a temporary name and rename so that a stale node with a
	// wrong device number is replaced without a window where none exists.
	tmp := filepath.Join(c.devDir, ".dmsetup-"+strconv.Itoa(os.Getpid())+"-"+name)
	if len(filepath.Base(tmp)) > 255 {
		tmp = filepath.Join(c.devDir, ".dmsetup-"+strconv.Itoa(os.Getpid())+"-"+strconv.FormatUint(want, 16))
	}
	_ = unix.Unlink(tmp)
	if c.udev {
		if err := unix.Symlink("/dev/dm-"+strconv.FormatUint(uint64(minor), 10), tmp); err != nil {
			return &os.PathError{Op: "symlink", Path: tmp, Err: err}
		}
	} else if err := unix.Mknod(tmp, unix.S_IFBLK|0o600, int(want)); err != nil {
		return &os.PathError{Op: "mknod", Path: tmp, Err: err}
	}
	if err := unix.Rename(tmp, path); err != nil {
		_ = unix.Unlink(tmp)
		return &os.PathError{Op: "rename", Path: path, Err: err}
	}
	return nil
}

// removeNode deletes <devdir>/<name> after the device is gone. Whatever
// block node or symlink is there is stale once the name is free; udev may
// race us removing its symlink, which is harmless.
func (c *Client) removeNode(name string) error {
	path := c.DevicePath(name)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	if m := st.Mode & unix.S_IFMT; m != unix.S_IFBLK && m != unix.S_IFLNK {
		return nil
	}
	if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "unlink", Path: path, Err: err}
	}
	return nil
}

// sysBlockDir is the sysfs directory of block device major:minor.
func sysBlockDir(major, minor uint32) string {
	return "/sys/dev/block/" + MajorMinor(major, minor)
}
