//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationGrowContainer: a container's snapshot, found by its id as
// the NRI hook finds it, grows from the base size to 2 GiB offline (it is
// not mounted yet) on ext4 and xfs, keeps its image's files, and stays at
// its class's size when asked for less. The grow's time is what the hook
// spends in the kernel and the filesystem tools.
func TestIntegrationGrowContainer(t *testing.T) {
	dmtest.Require(t)
	for _, fs := range []string{FSTypeExt4, FSTypeXFS} {
		t.Run(fs, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			cfg := testConfig(root)
			cfg.FSType, cfg.BaseSize = fs, 256<<20
			if fs == FSTypeXFS {
				cfg.BaseSize = 320 << 20
			}
			cfg.Classes = []SizeClass{{Name: "big", Size: 1 << 30}}
			s := newEmbedded(t, cfg)
			mnt := t.TempDir()
			withMount := func(key string, fn func()) {
				t.Helper()
				withMounted(ctx, t, s, key, mnt, fn)
			}

			// The image: one layer with a file.
			if _, err := s.Prepare(ctx, "k8s.io/1/layer-active", ""); err != nil {
				t.Fatal(err)
			}
			withMount("k8s.io/1/layer-active", func() {
				if err := os.WriteFile(filepath.Join(mnt, "image-file"), []byte("from the image\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			})
			if err := s.Commit(ctx, "k8s.io/2/layer", "k8s.io/1/layer-active"); err != nil {
				t.Fatal(err)
			}

			const big = 2 << 30
			var took []time.Duration
			for i := range 3 {
				id := fmt.Sprintf("%064x", i+1)
				if _, err := s.Prepare(ctx, fmt.Sprintf("k8s.io/%d/%s", 10+i, id), "k8s.io/2/layer"); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				snap, err := s.FindContainer(ctx, "k8s.io", id)
				if err != nil {
					t.Fatal(err)
				}
				if got, err := s.GrowContainer(ctx, snap.Key, big); err != nil || got != big {
					t.Fatalf("GrowContainer: %d, %v", got, err)
				}
				took = append(took, time.Since(start))
				withMount(snap.Key, func() {
					if got := fsBytes(t, mnt); !fills(got, big) {
						t.Errorf("the grown container's filesystem has %d bytes, want about %d", got, big)
					}
					if data, err := os.ReadFile(filepath.Join(mnt, "image-file")); err != nil || string(data) != "from the image\n" {
						t.Errorf("the image's file in the grown container: %q, %v", data, err)
					}
				})
			}
			slices.Sort(took)
			t.Logf("%s: find and grow a container's snapshot from %d MiB to %d GiB, offline: %v (3 rounds, sorted)",
				fs, cfg.BaseSize>>20, big>>30, took)

			// A class's container asking for less keeps the class's size.
			big1, err := s.Class("big")
			if err != nil {
				t.Fatal(err)
			}
			id := fmt.Sprintf("%064x", 99)
			if _, err := big1.Prepare(ctx, "k8s.io/3/"+id, ""); err != nil {
				t.Fatal(err)
			}
			snap, err := s.FindContainer(ctx, "k8s.io", id)
			if err != nil || snap.Class != "big" || snap.Size != 1<<30 {
				t.Fatalf("the class's container: %+v, %v", snap, err)
			}
			if got, err := s.GrowContainer(ctx, snap.Key, 512<<20); err != nil || got != 1<<30 {
				t.Fatalf("asking a 1 GiB class container for 512 MiB: %d, %v; want it kept at 1 GiB", got, err)
			}
			withMount(snap.Key, func() {
				if got := fsBytes(t, mnt); !fills(got, 1<<30) {
					t.Errorf("the class's container has %d bytes, want about 1 GiB", got)
				}
			})
		})
	}
}
