//go:build linux

package dmsetup

import (
	"context"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// discardChunk bounds one BLKDISCARD so a long discard can be stopped
// between chunks.
const discardChunk = 1 << 30

// Discard tells the storage under device name that none of its blocks hold
// data any more (BLKDISCARD over its whole length) and returns that length.
// On a thin device this unmaps its blocks; the pool passes the discard on to
// its data device when no other device shares a block and discard passdown
// is on, and a loop device over a sparse file punches holes in it. The
// device is opened exclusively: a mounted or otherwise claimed device is
// refused (EBUSY) rather than wiped under its user.
func (c *Client) Discard(ctx context.Context, name string) (Sectors, error) {
	if err := checkName(name); err != nil {
		return 0, err
	}
	path := c.DevicePath(name)
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, opError("discard open", name, err)
	}
	defer unix.Close(fd)
	size, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
	if err != nil {
		return 0, opError("discard size", name, err)
	}
	for off := uint64(0); off < size; off += discardChunk {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		r := [2]uint64{off, min(discardChunk, size-off)}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); errno != 0 {
			return 0, opError(fmt.Sprintf("discard %d+%d", r[0], r[1]), name, errno)
		}
	}
	return BytesToSectors(size), nil
}
