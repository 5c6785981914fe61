//go:build linux

package imagefs_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/cadvisortest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

// openMirror opens the mirror of root and takes it down at the end.
func openMirror(t *testing.T, root string, size uint64) *imagefs.Mirror {
	t.Helper()
	t.Cleanup(func() {
		if err := imagefs.Remove(root); err != nil {
			t.Errorf("removing the mirror: %v", err)
		}
	})
	start := time.Now()
	m, err := imagefs.Open(context.Background(), root, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Open of %d bytes: %s on %s in %s; the file takes %d KiB of the host", size, m.How, m.Device,
		time.Since(start).Round(time.Millisecond), hostBytes(t, root)>>10)
	return m
}

// hostBytes is what the mirror's sparse file takes of the host.
func hostBytes(t *testing.T, root string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(root, "imagefs.img"), &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Blocks) * 512
}

// want checks what statfs says of the mirror, and what cAdvisor says to a
// kubelet started after the mirror was mounted.
func want(t *testing.T, k *cadvisortest.Kubelet, root string, capacity, available uint64) imagefs.Stat {
	t.Helper()
	st, err := imagefs.StatDir(imagefs.Dir(root))
	if err != nil {
		t.Fatal(err)
	}
	if st.Capacity != capacity || st.Available != available {
		t.Errorf("statfs: capacity %d, available %d; want %d, %d", st.Capacity, st.Available, capacity, available)
	}
	if k == nil {
		return st
	}
	got, err := k.DirFsInfo(imagefs.Dir(root))
	if err != nil {
		t.Fatal(err)
	}
	if got.Capacity != capacity || got.Available != available || got.Major != uint(st.Major) || got.Minor != uint(st.Minor) {
		t.Errorf("cAdvisor: %+v; want capacity %d, available %d on %d:%d", got, capacity, available, st.Major, st.Minor)
	}
	return st
}

func set(t *testing.T, m *imagefs.Mirror, size, available uint64) {
	t.Helper()
	start := time.Now()
	if err := m.Set(context.Background(), size, available); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Logf("Set(%d, %d) took %s", size, available, d.Round(time.Millisecond))
	}
}

// The mirror's life: made, set, grown, reused by a restarted daemon,
// mounted again after a reboot, made again for a smaller pool. cAdvisor's
// answers follow statfs's, and a restart keeps the device number that a
// running kubelet knows the directory by.
func TestIntegrationMirror(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	m := openMirror(t, root, 1<<30)
	if m.How != imagefs.Made {
		t.Errorf("first Open: %s, want %s", m.How, imagefs.Made)
	}
	k, err := cadvisortest.Start()
	if err != nil {
		t.Fatal(err)
	}

	set(t, m, 1<<30, 300<<20)
	first := want(t, k, root, 1<<30, 300<<20)
	set(t, m, 1<<30, 0)
	want(t, k, root, 1<<30, 0)
	// More available than free: all that is free, and no more.
	set(t, m, 1<<30, 2<<30)
	if st := want(t, nil, root, 1<<30, first.Free); st.Available != st.Free {
		t.Errorf("available %d, free %d", st.Available, st.Free)
	}

	// Growth keeps the device: the kubelet goes on reading it.
	set(t, m, 3<<30, 2<<30)
	want(t, k, root, 3<<30, 2<<30)

	// A restarted daemon finds it mounted and changes nothing.
	again, err := imagefs.Open(ctx, root, 3<<30)
	if err != nil {
		t.Fatal(err)
	}
	if again.How != imagefs.Reused || again.Device != m.Device {
		t.Errorf("Open after a restart: %s on %s, want %s on %s", again.How, again.Device, imagefs.Reused, m.Device)
	}
	if st := want(t, k, root, 3<<30, 2<<30); st.Major != first.Major || st.Minor != first.Minor {
		t.Errorf("device %d:%d after a restart, %d:%d before", st.Major, st.Minor, first.Major, first.Minor)
	}
	set(t, again, 3<<30, 1<<30)
	want(t, k, root, 3<<30, 1<<30)

	// A reboot takes the mount; the next start mounts the file again.
	if err := unix.Unmount(imagefs.Dir(root), 0); err != nil {
		t.Fatal(err)
	}
	rebooted, err := imagefs.Open(ctx, root, 3<<30)
	if err != nil {
		t.Fatal(err)
	}
	if rebooted.How != imagefs.Mounted {
		t.Errorf("Open after a reboot: %s, want %s", rebooted.How, imagefs.Mounted)
	}
	set(t, rebooted, 3<<30, 512<<20)
	// A kubelet started after the reboot.
	k2, err := cadvisortest.Start()
	if err != nil {
		t.Fatal(err)
	}
	want(t, k2, root, 3<<30, 512<<20)

	// Another pool, smaller than the mirror: made again at its size.
	smaller, err := imagefs.Open(ctx, root, 512<<20)
	if err != nil {
		t.Fatal(err)
	}
	if smaller.How != imagefs.Made {
		t.Errorf("Open for a smaller pool: %s, want %s", smaller.How, imagefs.Made)
	}
	set(t, smaller, 512<<20, 100<<20)
	want(t, nil, root, 512<<20, 100<<20)
}

// What a mirror costs the host: about 1.7 MiB per TiB, made or grown.
func TestIntegrationMirrorHostCost(t *testing.T) {
	dmtest.Require(t)
	root := t.TempDir()
	const tib = 1 << 40
	m := openMirror(t, root, 100<<30)
	set(t, m, 100<<30, 50<<30)
	at100G := hostBytes(t, root)
	start := time.Now()
	set(t, m, tib, 600<<30)
	grew := time.Since(start)
	want(t, nil, root, tib, 600<<30)
	atTiB := hostBytes(t, root)
	t.Logf("host space: %d KiB at 100 GiB, %d KiB once grown to 1 TiB (the growth took %s)", at100G>>10, atTiB>>10, grew.Round(time.Millisecond))
	if atTiB > 4<<20 {
		t.Errorf("a 1 TiB mirror takes %d KiB of the host, want at most 4 MiB", atTiB>>10)
	}
}

// A mirror mounted at boot from /etc/fstab (loop, read-write) becomes the
// daemon's: reused, same device, made read-only.
func TestIntegrationMirrorAdoptsABootMount(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	m := openMirror(t, root, 256<<20)
	set(t, m, 256<<20, 100<<20)
	if err := unix.Unmount(imagefs.Dir(root), 0); err != nil {
		t.Fatal(err)
	}
	// What mount(8) does for "loop,minixdf,noinit_itable".
	l, err := dmsetup.AttachLoop(filepath.Join(root, "imagefs.img"))
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Mount(l.Path, imagefs.Dir(root), "ext4", 0, "minixdf,noinit_itable")
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	booted, err := imagefs.StatDir(imagefs.Dir(root))
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := imagefs.Open(ctx, root, 256<<20)
	if err != nil {
		t.Fatal(err)
	}
	if adopted.How != imagefs.Reused || adopted.Device != l.Path {
		t.Errorf("Open of the boot mount: %s on %s, want %s on %s", adopted.How, adopted.Device, imagefs.Reused, l.Path)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(imagefs.Dir(root), &fs); err != nil || fs.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("the adopted mirror is not read-only: flags %#x, %v", fs.Flags, err)
	}
	set(t, adopted, 256<<20, 50<<20)
	if st := want(t, nil, root, 256<<20, 50<<20); st.Major != booted.Major || st.Minor != booted.Minor {
		t.Errorf("device %d:%d, booted as %d:%d", st.Major, st.Minor, booted.Major, booted.Minor)
	}
}

// Open leaves alone what is not its mirror, and makes again a file that
// does not mount.
func TestIntegrationMirrorRefusesOtherMounts(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	dir := imagefs.Dir(root)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if _, err := imagefs.Open(ctx, root, 1<<30); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Open over a tmpfs: %v, want FailedPrecondition", err)
	}
	if err := imagefs.Remove(root); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Remove of a tmpfs: %v, want FailedPrecondition", err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		t.Errorf("the tmpfs is gone: type %#x, %v", fs.Type, err)
	}
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}

	// A file that is no filesystem (a crash in mkfs) is made again.
	if err := os.WriteFile(filepath.Join(root, "imagefs.img"), make([]byte, 64<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	m := openMirror(t, root, 64<<20)
	if m.How != imagefs.Made {
		t.Errorf("Open of a file that does not mount: %s, want %s", m.How, imagefs.Made)
	}
	set(t, m, 64<<20, 10<<20)
	want(t, nil, root, 64<<20, 10<<20)

	// Remove takes it down and leaves a plain directory.
	if err := imagefs.Remove(root); err != nil {
		t.Fatal(err)
	}
	if mounted, err := isMountPoint(dir); err != nil || mounted {
		t.Errorf("after Remove: mounted %v, %v", mounted, err)
	}
	if _, err := os.Stat(filepath.Join(root, "imagefs.img")); !os.IsNotExist(err) {
		t.Errorf("after Remove the file is there: %v", err)
	}
}

// isMountPoint reports whether dir is on another device than its parent.
func isMountPoint(dir string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Stat(dir, &a); err != nil {
		return false, err
	}
	if err := unix.Stat(filepath.Dir(dir), &b); err != nil {
		return false, err
	}
	return a.Dev != b.Dev, nil
}
