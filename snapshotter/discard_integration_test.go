package snapshotter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationDiscardOnDelete writes 100 MiB in a snapshot of the
// embedded pool and removes it, active or committed (with its warm device,
// which is never discarded: the layer's discard must still find the blocks
// unshared): with discard_on_delete the pool's sparse data file gives the
// space back to the host, without it the file keeps it.
func TestIntegrationDiscardOnDelete(t *testing.T) {
	dmtest.Require(t)
	const written = 100 << 20
	on, off := true, false
	for _, tc := range []struct {
		name    string
		discard *bool
		commit  bool // removed as a committed layer
		back    bool // the host gets the space back
	}{
		{"default", nil, false, true},
		{"off", &off, false, false},
		{"on, 10GiB devices", &on, false, true},
		{"committed", nil, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			cfg := Config{Root: root, DataSize: 2 << 30, BaseSize: 1 << 30, DiscardOnDelete: tc.discard}
			if tc.name == "on, 10GiB devices" {
				cfg.DataSize, cfg.BaseSize = 20<<30, 10<<30
			}
			s := newEmbedded(t, cfg)
			data := filepath.Join(root, poolDir, dmsetup.LoopDataFile)
			allocated := func() int64 {
				t.Helper()
				var st unix.Stat_t
				if err := unix.Stat(data, &st); err != nil {
					t.Fatal(err)
				}
				return st.Blocks * 512
			}
			before := allocated()
			m, err := s.Prepare(ctx, "a", "")
			if err != nil {
				t.Fatal(err)
			}
			mnt := t.TempDir()
			if err := mount.All(m, mnt); err != nil {
				t.Fatal(err)
			}
			err = os.WriteFile(filepath.Join(mnt, "f"), bytes.Repeat([]byte{0x5a}, written), 0o644)
			if err == nil {
				unix.Sync()
			}
			if uerr := mount.UnmountAll(mnt, 0); err == nil {
				err = uerr
			}
			if err != nil {
				t.Fatal(err)
			}
			full := allocated()
			if full-before < written {
				t.Fatalf("data file grew by %d bytes for %d written: the test shows nothing", full-before, written)
			}
			key := "a"
			if tc.commit {
				key = "c"
				if err := s.Commit(ctx, key, "a"); err != nil {
					t.Fatal(err)
				}
				if n := len(warmOf(t, s)[key]); n != 1 {
					t.Fatalf("%d warm devices of the committed layer, want 1", n)
				}
			}
			start := time.Now()
			if err := s.Remove(ctx, key); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			after := allocated()
			t.Logf("data file allocated: before %d MiB, after writing %d MiB, after remove %d MiB; remove took %s",
				before>>20, (full)>>20, after>>20, took)
			back := after-before <= written/10
			if back != tc.back {
				t.Errorf("space back to the host: %v, want %v (before %d, written %d, after %d)", back, tc.back, before, full, after)
			}
		})
	}
}
