//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// testConfig keeps pools and filesystems small: the VM is slow.
func testConfig(root string) Config {
	return Config{Root: root, DataSize: 1 << 30, MetadataSize: 16 << 20, BaseSize: 64 << 20}
}

// destroy removes the embedded pool of root with all its devices and files.
func destroy(root string) error {
	name, err := LoopPoolName(root)
	if err != nil {
		return err
	}
	return dmtest.DestroyLoopPool(context.Background(), name, filepath.Join(root, poolDir))
}

// newEmbedded opens a snapshotter on an embedded pool with cfg, closed and
// destroyed when the test ends.
func newEmbedded(t testing.TB, cfg Config) *Snapshotter {
	t.Helper()
	t.Cleanup(func() {
		if err := destroy(cfg.Root); err != nil {
			t.Error(err)
		}
	})
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// withMounted mounts snapshot key of s on dir for fn and unmounts it after.
func withMounted(ctx context.Context, t testing.TB, s *Snapshotter, key, dir string, fn func()) {
	t.Helper()
	m, err := s.Mounts(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, dir); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Fatal(err)
		}
	}()
	fn()
}

func newReal(ctx context.Context, cfg Config) (snapshots.Snapshotter, func() error, error) {
	s, err := New(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	return s, func() error {
		if err := s.Close(); err != nil {
			return err
		}
		return destroy(cfg.Root)
	}, nil
}

// TestIntegrationSuite runs containerd's snapshotter testsuite on real
// thin devices.
func TestIntegrationSuite(t *testing.T) {
	dmtest.Require(t)
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			t.Parallel() // each case has its own pool: both filesystems at once
			testsuite.SnapshotterSuite(t, "thin-"+fs, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				cfg := testConfig(root)
				cfg.FSType = fs
				if fs == "xfs" {
					cfg.BaseSize = 320 << 20 // mkfs.xfs refuses tiny filesystems
				}
				return newReal(ctx, cfg)
			})
		})
	}
}

// TestIntegrationBaseAndRestart checks the base filesystem (empty root
// directory of mode 0755, no lost+found), data written through a mount,
// and that a restart — also after a reboot took the dm devices away —
// serves the same snapshots.
func TestIntegrationBaseAndRestart(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := destroy(root); err != nil {
			t.Error(err)
		}
	})
	mnt := t.TempDir()
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(mnt)
	if err != nil || len(entries) != 0 {
		t.Errorf("base root holds %v (%v), want nothing", entries, err)
	}
	if st, err := os.Stat(mnt); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("base root mode %v (%v), want 0755", st.Mode(), err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if u, err := s.Usage(ctx, "c"); err != nil || u.Size == 0 {
		t.Errorf("usage of committed = %+v, %v", u, err)
	}
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "b", "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// A reboot: the snapshot devices are gone (the pool stays, as an LVM
	// pool would come back).
	name, _ := LoopPoolName(root)
	if err := dmtest.RemoveDevices(ctx, dmsetup.DeviceNamePrefix(name)); err != nil {
		t.Fatal(err)
	}

	s2, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, k := range []string{"v", "b"} {
		m, err := s2.Mounts(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		if err := mount.All(m, mnt); err != nil {
			t.Fatalf("mount %s after restart: %v", k, err)
		}
		got, err := os.ReadFile(filepath.Join(mnt, "f"))
		if string(got) != "hello" {
			t.Errorf("%s: read %q, %v", k, got, err)
		}
		if k == "v" {
			if err := os.WriteFile(filepath.Join(mnt, "g"), nil, 0o644); err == nil {
				t.Errorf("view is writable")
			}
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
	}
	// A second daemon on the same root is refused, not blocked.
	if _, err := New(ctx, cfg); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second snapshotter on the same root: %v", err)
	}
	// Remove everything: only the base stays in the pool.
	for _, k := range []string{"v", "b", "c"} {
		if err := s2.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command("dmsetup", "ls").CombinedOutput()
	if err == nil && strings.Contains(string(out), dmsetup.DeviceNamePrefix(name)) {
		t.Errorf("snapshot devices left after removing all: %s", out)
	}
}

// TestIntegrationFullPool fills a tiny pool from a container's mount until
// it runs out: new snapshots are refused with ResourceExhausted naming the
// pool, the existing ones stay usable, removing one gives the space back,
// and the database stays consistent throughout. With async_remove the
// removal waits for a worker that never comes: the next Prepare, short of
// space, finishes it itself.
func TestIntegrationFullPool(t *testing.T) {
	dmtest.Require(t)
	for _, async := range []bool{false, true} {
		t.Run(fmt.Sprintf("async_remove=%v", async), func(t *testing.T) { testFullPool(t, async) })
	}
}

func testFullPool(t *testing.T, async bool) {
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	cfg.DataSize = 96 << 20
	cfg.BaseSize = 256 << 20 // larger than the pool: the pool fills, not the filesystem
	cfg.AsyncRemove = async
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		if err := destroy(root); err != nil {
			t.Error(err)
		}
	})
	mustLayer(ctx, t, s, "image", "p", "")
	m, err := s.Prepare(ctx, "container", "image")
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}()
	// Fill: random-looking data, synced, until the pool refuses.
	f, err := os.Create(filepath.Join(mnt, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>8)
	}
	written := 0
	var werr error
	for written < 200 && werr == nil {
		buf[0]++
		if _, werr = f.Write(buf); werr == nil {
			werr = f.Sync()
		}
		written++
	}
	f.Close()
	if werr == nil {
		t.Fatalf("wrote %d MiB into a 96MiB pool without an error", written)
	}
	t.Logf("pool full after %d MiB: %v", written, werr)
	st, err := s.pool.Status()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pool status: %s", st)

	_, err = s.Prepare(ctx, "another", "image")
	if !errdefs.IsResourceExhausted(err) || !strings.Contains(err.Error(), s.pool.Name()) {
		t.Fatalf("Prepare on a full pool = %v, want ResourceExhausted naming the pool", err)
	}
	t.Logf("Prepare refused: %v", err)
	if _, err := s.View(ctx, "view", "image"); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("View on a full pool = %v, want ResourceExhausted", err)
	}
	// Existing snapshots stay usable: the container's files read back.
	if _, err := os.ReadDir(mnt); err != nil {
		t.Errorf("reading the full container's mount: %v", err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if _, err := s.Usage(ctx, "container"); err != nil {
		t.Error(err)
	}
	if _, err := s.Stat(ctx, "image"); err != nil {
		t.Error(err)
	}
	// Removing the container gives the space back.
	if async {
		stopWorker(s)
	}
	if err := s.Remove(ctx, "container"); err != nil {
		t.Fatal(err)
	}
	st, _ = s.pool.Status()
	t.Logf("after remove: %s", st)
	if async && st.Mode != dmsetup.PoolModeOutOfDataSpace {
		t.Fatalf("pool mode %s with the removal pending, want %s", st.Mode, dmsetup.PoolModeOutOfDataSpace)
	}
	if _, err := s.Prepare(ctx, "again", "image"); err != nil {
		t.Fatalf("Prepare after freeing space: %v", err)
	}
	if st, err = s.pool.Status(); err != nil {
		t.Fatal(err)
	}
	t.Logf("after Prepare: %s", st)
	if sst, err := s.Status(ctx); err != nil || sst.PendingRemovals != 0 {
		t.Errorf("%d removals still pending (%v)", sst.PendingRemovals, err)
	}
}

// TestIntegrationPoolNameNotAPool: a configured pool that is some other dm
// device is refused as InvalidArgument before anything is written to it.
func TestIntegrationPoolNameNotAPool(t *testing.T) {
	dmtest.Require(t)
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	name := "thin-test-notpool-" + strconv.Itoa(os.Getpid())
	if err := c.Create(name, []dmsetup.Target{{Length: 8, Type: "error"}}, dmsetup.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := c.Remove(context.Background(), name, dmsetup.RemoveOptions{}); err != nil {
			t.Error(err)
		}
	}()
	cfg := testConfig(t.TempDir())
	cfg.PoolName = name
	if s, err := New(t.Context(), cfg); !errdefs.IsInvalidArgument(err) {
		if err == nil {
			s.Close()
		}
		t.Fatalf("New on a device that is not a thin pool: %v, want InvalidArgument", err)
	}
}
