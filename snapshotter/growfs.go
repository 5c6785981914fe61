//go:build linux

package snapshotter

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// growFS makes the filesystem on dev fill its device, which has just
// grown. A mounted filesystem grows online where it is mounted (a running
// container's root); an unmounted one on a private mount that is always
// taken down again. fresh is a new device nobody has mounted, made from a
// committed (cleanly unmounted) origin: an ext4 one grows offline, which
// is cheaper than a mount.
func (s *Snapshotter) growFS(ctx context.Context, dev, fsType string, fresh bool) error {
	if fresh && fsType == FSTypeExt4 {
		// -f: the origin was mounted after its last fsck, which
		// resize2fs would otherwise refuse; it was unmounted cleanly.
		return run(ctx, "resize2fs", "-f", dev)
	}
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
	// Not mounted where the daemon can see it: mounting it again while
	// it is open elsewhere (another mount namespace) would be two
	// filesystems on one device.
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s is in use but not mounted in the daemon's mount namespace: %w: %w", dev, err, errdefs.ErrFailedPrecondition)
	}
	unix.Close(fd)
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
