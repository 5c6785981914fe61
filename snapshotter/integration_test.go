package snapshotter

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// testConfig keeps pools and filesystems small: the VM is slow.
func testConfig(root string) Config {
	return Config{Root: root, DataSize: 1 << 30, BaseSize: 64 << 20}
}

// destroy removes the embedded pool of root with all its devices and files.
func destroy(root string) error {
	name, err := LoopPoolName(root)
	if err != nil {
		return err
	}
	return dmtest.DestroyLoopPool(context.Background(), name, filepath.Join(root, poolDir))
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
	if err := dmtest.RemoveDevices(ctx, name+"-snap-"); err != nil {
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
	if err == nil && strings.Contains(string(out), name+"-snap-") {
		t.Errorf("snapshot devices left after removing all: %s", out)
	}
}
