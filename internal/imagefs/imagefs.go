//go:build linux

// Package imagefs is the image filesystem mirror: a small ext4 filesystem
// whose size and free space are made the thin pool's, mounted at the
// directory CRI reports as the image filesystem. The kubelet takes the
// image filesystem's capacity and free space from statfs of that directory
// (through cAdvisor), for its image garbage collection and disk-pressure
// eviction; with the mirror there, statfs answers with the pool's numbers.
//
// The filesystem is a sparse file on a loop device, formatted once (no
// journal, few inodes, meta_bg so that it grows online) and mounted
// read-only with minixdf, so that statfs counts every block: its capacity
// is the size asked for, to the block. Its space available to unprivileged
// users (statfs f_bavail, cAdvisor's "available") is set with ext4's
// reserved clusters (/sys/fs/ext4/<device>/reserved_clusters), which write
// no block. A larger size grows the file, the loop device and the
// filesystem (resize2fs, online).
//
// The mount outlives the daemon: cAdvisor maps a directory to its
// filesystem by device number, from a list of mounts it reads once when the
// kubelet starts, so Open reuses a mirror it finds mounted rather than
// making a new device.
//
// A Mirror is not safe for concurrent use: the snapshotter calls it from
// one goroutine.
package imagefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

const (
	// dirName and fileName are the mount point and the backing file, under
	// the daemon's root.
	dirName  = "imagefs"
	fileName = "imagefs.img"

	// BlockSize is the mirror's block size: sizes are rounded down to it.
	BlockSize = 4096
	// MinSize is the smallest mirror: the smallest pool is larger.
	MinSize = 16 << 20

	// mountFlags: nothing is written there, run or made a device.
	mountFlags = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	// mountData: statfs counts the blocks ext4 keeps for itself too, so
	// the capacity is the size asked for.
	mountData = "minixdf"
	// growData is the writable remount for resize2fs: no background
	// zeroing of inode tables that are never used.
	growData = "minixdf,noinit_itable"
)

// mkfsArgs format the mirror. No journal (nothing is written but by a
// resize), no root reserve (f_bavail is set through reserved clusters
// alone), few inodes, meta_bg so that an online resize needs no reserved
// descriptor blocks, and 256 groups per flex group so that fewer block
// bitmaps are written (about 1.7 MiB of the host per TiB of mirror).
var mkfsArgs = []string{
	"-q", "-F", "-b", strconv.Itoa(BlockSize), "-m", "0", "-N", "1024", "-G", "256", "-L", "thin-imagefs",
	"-O", "^has_journal,^resize_inode,meta_bg", "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0",
}

// Dir is the mirror's mount point under a daemon's root: the directory
// containerd's exports root names, which CRI reports to the kubelet.
func Dir(root string) string { return filepath.Join(root, dirName) }

// How says what Open found.
type How string

const (
	// Reused means the mirror was mounted already (a daemon restart).
	Reused How = "reused"
	// Mounted means it was mounted from its file (after a reboot).
	Mounted How = "mounted"
	// Made means it was formatted anew (the first start, or a pool
	// smaller than the mirror).
	Made How = "made"
)

// Mirror is a mounted image filesystem mirror.
type Mirror struct {
	// How is what Open found.
	How How
	// Device is the loop device, e.g. /dev/loop3.
	Device string

	file, dir string
	// reserved is the filesystem's reserved_clusters file in sysfs.
	reserved string
	// size is the backing file's size: the size last asked for.
	size uint64
	// set is the reserve last written; valid is false until one is.
	set   uint64
	valid bool
}

// Open mounts the mirror of size bytes at Dir(root): it reuses a mirror
// mounted there, mounts it from its file under root, or makes the file. A
// mirror larger than size is made again (another, smaller pool). Anything
// else mounted at Dir(root) is FailedPrecondition and left alone.
func Open(ctx context.Context, root string, size uint64) (*Mirror, error) {
	size = size / BlockSize * BlockSize
	if size < MinSize {
		return nil, fmt.Errorf("image filesystem mirror of %d bytes: at least %d: %w", size, MinSize, errdefs.ErrInvalidArgument)
	}
	m, err := paths(root, true)
	if err != nil {
		return nil, err
	}
	dev, err := m.mounted()
	if err != nil {
		return nil, err
	}
	if dev != "" {
		fsize, err := fileSize(m.file)
		if err != nil {
			return nil, err
		}
		if fsize > size {
			// Another pool, smaller than the one it mirrored.
			if err := unmount(m.dir); err != nil {
				return nil, err
			}
			dev = ""
		}
	}
	if dev != "" {
		// A mount made by someone else (an fstab line) becomes ours.
		if err := unix.Mount("", m.dir, "", unix.MS_REMOUNT|mountFlags, mountData); err != nil {
			return nil, fmt.Errorf("remounting %s read-only: %w", m.dir, err)
		}
		m.How = Reused
	} else if dev, err = m.mount(ctx, size); err != nil {
		return nil, err
	}
	m.Device = dev
	m.reserved = filepath.Join("/sys/fs/ext4", filepath.Base(dev), "reserved_clusters")
	if m.size, err = fileSize(m.file); err != nil {
		return nil, err
	}
	if size > m.size {
		if err := m.grow(ctx, size); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// paths is the mirror of root, its paths resolved as the kernel reports
// them (mountinfo, a loop device's backing file); with create, the mount
// point is made when missing.
func paths(root string, create bool) (*Mirror, error) {
	if create {
		if err := os.MkdirAll(Dir(root), 0o700); err != nil {
			return nil, fmt.Errorf("image filesystem mirror: %w", err)
		}
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	resolved, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("image filesystem mirror: %w", err)
	}
	return &Mirror{file: filepath.Join(resolved, fileName), dir: Dir(resolved)}, nil
}

// mounted returns the loop device of the mirror mounted at m.dir, "" when
// nothing is mounted there, and FailedPrecondition when something else is.
func (m *Mirror) mounted() (string, error) {
	mounts, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		return i.Mountpoint != m.dir, false
	})
	if err != nil {
		return "", fmt.Errorf("mounts at %s: %w", m.dir, err)
	}
	if len(mounts) == 0 {
		return "", nil
	}
	// The last one is on top: the one stat sees.
	top := mounts[len(mounts)-1]
	dev, backing := dmsetup.LoopBacking(uint32(top.Major), uint32(top.Minor))
	if top.FSType != "ext4" || backing != m.file {
		return "", fmt.Errorf("%s is a mount of %s (%s), not the image filesystem mirror on %s: unmount it, or turn the mirror off: %w",
			m.dir, top.Source, top.FSType, m.file, errdefs.ErrFailedPrecondition)
	}
	return dev, nil
}

// mount mounts the mirror from its file, made first when missing or larger
// than size, and made again when it does not mount (a file left half-made).
func (m *Mirror) mount(ctx context.Context, size uint64) (string, error) {
	m.How = Mounted
	fsize, err := fileSize(m.file)
	switch {
	case errors.Is(err, fs.ErrNotExist) || err == nil && fsize > size:
		m.How = Made
	case err != nil:
		return "", err
	}
	if m.How == Made {
		if err := m.format(ctx, size); err != nil {
			return "", err
		}
	}
	dev, err := m.attach()
	if err == nil || m.How == Made {
		return dev, err
	}
	m.How = Made
	if err := m.format(ctx, size); err != nil {
		return "", err
	}
	return m.attach()
}

// attach binds the file to a loop device and mounts it. The mount holds
// the loop device, which clears itself once unmounted.
func (m *Mirror) attach() (string, error) {
	l, err := dmsetup.AttachLoop(m.file)
	if err != nil {
		return "", fmt.Errorf("image filesystem mirror: loop device for %s: %w", m.file, err)
	}
	defer l.Close()
	if err := unix.Mount(l.Path, m.dir, "ext4", mountFlags, mountData); err != nil {
		return "", fmt.Errorf("mounting %s (%s) at %s: %w", l.Path, m.file, m.dir, err)
	}
	return l.Path, nil
}

// format makes the file anew, size bytes, sparse, and formats it.
func (m *Mirror) format(ctx context.Context, size uint64) (err error) {
	if err := os.Remove(m.file); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.Remove(m.file)
		}
	}()
	f, err := os.OpenFile(m.file, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(size))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("image filesystem mirror: %s of %d bytes: %w", m.file, size, err)
	}
	args := append(append([]string(nil), mkfsArgs...), m.file)
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %v: %w: %s", args, err, out)
	}
	return nil
}

// Set makes statfs of the mirror report a capacity of size bytes (growing
// it when size is larger than it is; it never shrinks) of which available
// bytes are available.
func (m *Mirror) Set(ctx context.Context, size, available uint64) error {
	if size = size / BlockSize * BlockSize; size > m.size {
		if err := m.grow(ctx, size); err != nil {
			return err
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(m.dir, &st); err != nil {
		return &os.PathError{Op: "statfs", Path: m.dir, Err: err}
	}
	r := reserve(st.Bfree, available/uint64(st.Bsize))
	if m.valid && r == m.set {
		return nil
	}
	if err := os.WriteFile(m.reserved, []byte(strconv.FormatUint(r, 10)), 0); err != nil {
		return fmt.Errorf("image filesystem mirror: %w", err)
	}
	m.set, m.valid = r, true
	return nil
}

// reserve is the reserved clusters (one cluster is one block) that leave
// available of free blocks available; all of them when available is more.
func reserve(free, available uint64) uint64 { return free - min(free, available) }

// grow makes the file, the loop device and the filesystem size bytes. On
// failure the file takes its size back, so that the next Set tries again.
func (m *Mirror) grow(ctx context.Context, size uint64) (err error) {
	old := m.size
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("growing the image filesystem mirror from %d to %d bytes: %w", old, size, err),
				os.Truncate(m.file, int64(old)), dmsetup.RefreshLoopCapacity(m.Device))
		}
	}()
	if err := os.Truncate(m.file, int64(size)); err != nil {
		return err
	}
	if err := dmsetup.RefreshLoopCapacity(m.Device); err != nil {
		return err
	}
	// resize2fs grows a mounted ext4 only through a writable mount.
	if err := unix.Mount("", m.dir, "", unix.MS_REMOUNT|mountFlags&^unix.MS_RDONLY, growData); err != nil {
		return fmt.Errorf("remounting %s writable: %w", m.dir, err)
	}
	out, rerr := exec.CommandContext(ctx, "resize2fs", m.Device).CombinedOutput()
	if err := unix.Mount("", m.dir, "", unix.MS_REMOUNT|mountFlags, mountData); err != nil {
		rerr = errors.Join(rerr, fmt.Errorf("remounting %s read-only: %w", m.dir, err))
	}
	if rerr != nil {
		return fmt.Errorf("resize2fs %s: %w: %s", m.Device, rerr, out)
	}
	m.size, m.valid = size, false
	return nil
}

// Stat is what cAdvisor reports of the filesystem holding a directory,
// from the same stat and statfs calls: its device and sizes in bytes.
type Stat struct {
	Major, Minor              uint32
	Capacity, Free, Available uint64
	Inodes, InodesFree        uint64
}

// StatDir returns the Stat of the filesystem holding dir.
func StatDir(dir string) (Stat, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return Stat{}, &os.PathError{Op: "stat", Path: dir, Err: err}
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return Stat{}, &os.PathError{Op: "statfs", Path: dir, Err: err}
	}
	bs := uint64(fs.Frsize)
	return Stat{
		Major: unix.Major(st.Dev), Minor: unix.Minor(st.Dev),
		Capacity: fs.Blocks * bs, Free: fs.Bfree * bs, Available: fs.Bavail * bs,
		Inodes: fs.Files, InodesFree: fs.Ffree,
	}, nil
}

// Remove takes the mirror of root down: it unmounts it (its loop device
// clears itself) and deletes its file. The mount point stays, a plain
// directory. Something else mounted there is FailedPrecondition.
func Remove(root string) error {
	if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	m, err := paths(root, false)
	if err != nil {
		return err
	}
	dev, err := m.mounted()
	if err != nil {
		return err
	}
	if dev != "" {
		if err := unmount(m.dir); err != nil {
			return err
		}
	}
	if err := os.Remove(m.file); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func unmount(dir string) error {
	if err := unix.Unmount(dir, 0); err != nil {
		return &os.PathError{Op: "unmount", Path: dir, Err: err}
	}
	return nil
}

func fileSize(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return uint64(fi.Size()), nil
}
