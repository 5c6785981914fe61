//go:build linux

package snapshotter

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

// ext4Clean reads the superblock of a fresh filesystem image as clean, and
// as not clean once it is marked with errors or a journal to replay.
func TestExt4Clean(t *testing.T) {
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4: %v: %s", err, out) // e2fsprogs is on every bench; not on every dev box
	}
	if clean, err := ext4Clean(img); err != nil || !clean {
		t.Fatalf("fresh filesystem: clean %v, %v", clean, err)
	}
	patch := func(off int64, fn func(b []byte)) {
		t.Helper()
		f, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 4)
		if _, err := f.ReadAt(b, ext4SuperOffset+off); err != nil {
			t.Fatal(err)
		}
		fn(b)
		if _, err := f.WriteAt(b, ext4SuperOffset+off); err != nil {
			t.Fatal(err)
		}
	}
	patch(ext4IncompatOffset, func(b []byte) { binary.LittleEndian.PutUint32(b, binary.LittleEndian.Uint32(b)|ext4NeedsRecovery) })
	if clean, err := ext4Clean(img); err != nil || clean {
		t.Fatalf("journal to replay: clean %v, %v", clean, err)
	}
	patch(ext4IncompatOffset, func(b []byte) { binary.LittleEndian.PutUint32(b, binary.LittleEndian.Uint32(b)&^ext4NeedsRecovery) })
	patch(ext4StateOffset, func(b []byte) { binary.LittleEndian.PutUint16(b, ext4StateValid|ext4StateError) })
	if clean, err := ext4Clean(img); err != nil || clean {
		t.Fatalf("errors recorded: clean %v, %v", clean, err)
	}
	patch(ext4MagicOffset, func(b []byte) { binary.LittleEndian.PutUint16(b, 0) })
	if _, err := ext4Clean(img); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("no ext4: %v", err)
	}
}
