//go:build linux

package dmsetup

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for mknod")
	}
}

func nodeKind(t *testing.T, path string) (uint32, uint64, string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, 0, ""
	}
	link, _ := os.Readlink(path)
	return st.Mode & unix.S_IFMT, st.Rdev, link
}

func TestEnsureNodeWithoutUdev(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "mapper") // created on demand
	c := &Client{devDir: dir, fd: -1}
	path := c.DevicePath("thin-1")

	steps := []struct {
		name         string
		setup        func()
		major, minor uint32
	}{
		{"create", nil, 253, 4},
		{"idempotent", nil, 253, 4},
		{"stale number replaced", nil, 253, 9},
		{"regular file replaced", func() {
			os.Remove(path)
			if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, 253, 10},
		{"symlink replaced", func() {
			os.Remove(path)
			if err := os.Symlink("/dev/null", path); err != nil {
				t.Fatal(err)
			}
		}, 253, 11},
	}
	for _, s := range steps {
		if s.setup != nil {
			s.setup()
		}
		if err := c.ensureNode("thin-1", s.major, s.minor); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		mode, rdev, _ := nodeKind(t, path)
		if mode != unix.S_IFBLK || rdev != unix.Mkdev(s.major, s.minor) {
			t.Fatalf("%s: mode %o rdev %d:%d", s.name, mode, unix.Major(rdev), unix.Minor(rdev))
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("leftover temporary nodes: %v", entries)
	}
	if err := c.removeNode("thin-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("node still there: %v", err)
	}
	if err := c.removeNode("thin-1"); err != nil {
		t.Errorf("removing a missing node: %v", err)
	}
}

func TestEnsureNodeWithUdev(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	c := &Client{devDir: dir, fd: -1, udev: true}
	path := c.DevicePath("pool")

	// Missing: the symlink udev would make, so nobody waits for udev.
	if err := c.ensureNode("pool", 253, 3); err != nil {
		t.Fatal(err)
	}
	if mode, _, link := nodeKind(t, path); mode != unix.S_IFLNK || link != "/dev/dm-3" {
		t.Fatalf("got mode %o link %q", mode, link)
	}
	// udev's own symlink is left alone.
	os.Remove(path)
	if err := os.Symlink("../dm-3", path); err != nil {
		t.Fatal(err)
	}
	if err := c.ensureNode("pool", 253, 3); err != nil {
		t.Fatal(err)
	}
	if _, _, link := nodeKind(t, path); link != "../dm-3" {
		t.Fatalf("udev symlink replaced by %q", link)
	}
	if err := c.removeNode("pool"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("symlink still there: %v", err)
	}
}

func TestRemoveNodeKeepsOtherFiles(t *testing.T) {
	dir := t.TempDir()
	c := &Client{devDir: dir, fd: -1}
	path := c.DevicePath("notes")
	if err := os.WriteFile(path, []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.removeNode("notes"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("regular file removed: %v", err)
	}
}
