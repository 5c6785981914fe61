//go:build linux

package imagefs

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

func TestReserve(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		free, available, want uint64
	}{
		{"some available", 1000, 300, 700},
		{"all available", 1000, 1000, 0},
		{"more than free", 1000, 5000, 0},
		{"none available", 1000, 0, 1000},
		{"empty", 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := reserve(tc.free, tc.available); got != tc.want {
				t.Errorf("reserve(%d, %d) = %d, want %d", tc.free, tc.available, got, tc.want)
			}
			if got := tc.free - reserve(tc.free, tc.available); got != min(tc.free, tc.available) {
				t.Errorf("free %d less reserve leaves %d, want %d", tc.free, got, min(tc.free, tc.available))
			}
		})
	}
}

func TestDir(t *testing.T) {
	if got := Dir("/var/lib/thin-snapshotter"); got != "/var/lib/thin-snapshotter/imagefs" {
		t.Errorf("Dir = %q", got)
	}
}

// Sizes below MinSize are refused before anything is made.
func TestOpenRefusesTinySizes(t *testing.T) {
	root := t.TempDir()
	for _, size := range []uint64{0, BlockSize - 1, MinSize - BlockSize, MinSize - 1} {
		if _, err := Open(context.Background(), root, size); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Open of %d bytes: %v, want InvalidArgument", size, err)
		}
	}
	if entries, err := os.ReadDir(root); err != nil || len(entries) != 0 {
		t.Errorf("root after refused Opens: %v %v", entries, err)
	}
}

// Remove of a root without a mirror takes nothing and fails nothing: a
// plain directory and a missing root alike.
func TestRemoveWithoutMirror(t *testing.T) {
	root := t.TempDir()
	if err := Remove(filepath.Join(root, "missing")); err != nil {
		t.Errorf("Remove of a missing root: %v", err)
	}
	if err := os.MkdirAll(Dir(root), 0o755); err != nil {
		t.Fatal(err)
	}
	keep := filepath.Join(Dir(root), "keep")
	if err := os.WriteFile(keep, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Remove(root); err != nil {
		t.Errorf("Remove of a plain directory: %v", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("Remove touched the plain directory: %v", err)
	}
}

func TestStatDir(t *testing.T) {
	st, err := StatDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st.Capacity == 0 || st.Available > st.Capacity || st.Free > st.Capacity {
		t.Errorf("StatDir = %+v", st)
	}
	if _, err := StatDir(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("StatDir of a missing directory succeeded")
	}
}
