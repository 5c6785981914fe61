//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// WaitEvent blocks until the event counter of device name differs from
// eventNr and returns the device's info with the new counter. A thin pool
// raises an event when its free data space falls under the low water mark
// of its table, when free metadata falls under the kernel's threshold, and
// when its mode changes. It waits with DM_DEV_ARM_POLL and poll(2) on a
// control file descriptor of its own, which wakes on any dm event (kernels
// 4.13 and later), and an eventfd, so that cancelling ctx ends the wait at
// once.
func (c *Client) WaitEvent(ctx context.Context, name string, eventNr uint32) (Info, error) {
	if err := checkName(name); err != nil {
		return Info{}, opError("wait", name, err)
	}
	fd, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Info{}, opError("wait", name, err)
	}
	defer unix.Close(fd)
	cancel, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return Info{}, opError("wait", name, err)
	}
	defer unix.Close(cancel)
	stop := context.AfterFunc(ctx, func() {
		var one [8]byte
		ne.PutUint64(one[:], 1)
		_, _ = unix.Write(cancel, one[:])
	})
	defer stop()
	for {
		// Arm the poll before reading the counter: an event that comes
		// after the read still wakes the poll, so none is missed.
		req, err := newRequest("", 0, 0)
		if err != nil {
			return Info{}, opError("wait", name, err)
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.DM_DEV_ARM_POLL, uintptr(unsafe.Pointer(&req.buf[0]))); errno != 0 {
			return Info{}, opError("wait arm poll", name, errno)
		}
		info, err := c.Info(name)
		if err != nil || info.EventNr != eventNr {
			return info, err
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(cancel), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			return Info{}, opError("wait poll", name, err)
		}
		if err := ctx.Err(); err != nil {
			return Info{}, err
		}
	}
}
