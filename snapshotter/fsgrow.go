//go:build linux

package snapshotter

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// fillDevice makes the filesystem on dev fill its device, which has just
// grown. A mounted filesystem grows online where it is mounted (a running
// container's root). An unmounted one grows offline if it is a cleanly
// unmounted ext4 (cheaper, and it leaves the new inode tables unwritten,
// where the kernel's online resize zeroes them into the pool), otherwise on
// a private mount that is always taken down again.
func (s *Snapshotter) fillDevice(ctx context.Context, dev, fsType string) error {
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		return fmt.Errorf("stat %s: %w", dev, err)
	}
	mnt, err := findMount(unix.Major(st.Rdev), unix.Minor(st.Rdev))
	if err != nil {
		return err
	}
	if mnt != "" {
		return growMounted(ctx, dev, fsType, mnt)
	}
	// Not mounted where the daemon can see it: growing it while it is
	// open elsewhere (another mount namespace) would be two filesystems
	// on one device.
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s is in use but not mounted in the daemon's mount namespace: %w: %w", dev, err, errdefs.ErrFailedPrecondition)
	}
	unix.Close(fd)
	if fsType == FSTypeExt4 {
		clean, err := ext4Clean(dev)
		if err != nil {
			return err
		}
		if clean {
			// -f: it was mounted after its last fsck, which
			// resize2fs would otherwise refuse.
			return run(ctx, "resize2fs", "-f", dev)
		}
		// The filesystem has a journal to replay, which only a
		// mount does: grow it on a mount.
	}
	return s.growOnMount(ctx, dev, fsType)
}

// growOnMount grows the unmounted filesystem on dev on a private mount.
func (s *Snapshotter) growOnMount(ctx context.Context, dev, fsType string) error {
	dir, err := os.MkdirTemp(s.cfg.Root, "grow-")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	data := ""
	if fsType == FSTypeXFS {
		data = "nouuid"
	}
	if err := unix.Mount(dev, dir, fsType, unix.MS_NOATIME, data); err != nil {
		return fmt.Errorf("mount %s to grow it: %w", dev, err)
	}
	err = growMounted(ctx, dev, fsType, dir)
	if uerr := unix.Unmount(dir, 0); uerr != nil {
		// Never leave it behind: detach it at least.
		err = errors.Join(err, fmt.Errorf("unmount %s: %w", dir, uerr), unix.Unmount(dir, unix.MNT_DETACH))
	}
	return err
}

// Fields of the ext4 superblock, which starts 1024 bytes into the device.
const (
	ext4SuperOffset     = 1024
	ext4MagicOffset     = 0x38
	ext4StateOffset     = 0x3a
	ext4IncompatOffset  = 0x60
	ext4Magic           = 0xef53
	ext4StateValid      = 0x1
	ext4StateError      = 0x2
	ext4NeedsRecovery   = 0x4
	ext4SuperReadLength = ext4IncompatOffset + 4
)

// ext4Clean reports whether the ext4 filesystem on dev was unmounted
// cleanly: marked valid, without errors or a journal to replay. Only then
// may resize2fs skip its own checks.
func ext4Clean(dev string) (bool, error) {
	f, err := os.Open(dev)
	if err != nil {
		return false, err
	}
	defer f.Close()
	sb := make([]byte, ext4SuperReadLength)
	if _, err := f.ReadAt(sb, ext4SuperOffset); err != nil {
		return false, fmt.Errorf("read ext4 superblock of %s: %w", dev, err)
	}
	if binary.LittleEndian.Uint16(sb[ext4MagicOffset:]) != ext4Magic {
		return false, fmt.Errorf("%s holds no ext4 filesystem: %w", dev, errdefs.ErrFailedPrecondition)
	}
	state := binary.LittleEndian.Uint16(sb[ext4StateOffset:])
	incompat := binary.LittleEndian.Uint32(sb[ext4IncompatOffset:])
	return state&ext4StateValid != 0 && state&ext4StateError == 0 && incompat&ext4NeedsRecovery == 0, nil
}

// growMounted grows the filesystem on dev, mounted at mnt, online.
func growMounted(ctx context.Context, dev, fsType, mnt string) error {
	if fsType == FSTypeXFS {
		return run(ctx, "xfs_growfs", mnt)
	}
	return run(ctx, "resize2fs", dev)
}

func run(ctx context.Context, bin string, args ...string) error {
	if out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %w: %s", bin, args, err, out)
	}
	return nil
}

// findMount returns a mount point of the block device major:minor in the
// daemon's mount namespace, or "" if it is not mounted there.
func findMount(major, minor uint32) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", major, minor)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ...
		fields := strings.Fields(sc.Text())
		if len(fields) >= 5 && fields[2] == want {
			return unescapeMount(fields[4]), nil
		}
	}
	return "", sc.Err()
}

// unescapeMount undoes the octal escapes (\040 for a space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
