//go:build linux

package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// fsBytes is the size of the filesystem mounted at dir as df shows it.
func fsBytes(t *testing.T, dir string) uint64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * uint64(st.Bsize)
}

// fills reports whether a filesystem of got bytes fills a device of size
// bytes: ext4 and xfs keep a few percent for their own metadata.
func fills(got, size uint64) bool { return got <= size && got >= size/100*90 }

// TestIntegrationMaxSize: the max-size label at Prepare and on Update, on
// ext4 and xfs, with the filesystem size seen through a mount; and what a
// sized Prepare costs next to a plain one.
func TestIntegrationMaxSize(t *testing.T) {
	dmtest.Require(t)
	for _, fs := range []string{FSTypeExt4, FSTypeXFS} {
		t.Run(fs, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			cfg := testConfig(root)
			cfg.FSType = fs
			if fs == FSTypeXFS {
				cfg.BaseSize = 320 << 20
			}
			s := newEmbedded(t, cfg)
			const big = 2 << 30
			mnt := t.TempDir()
			withMount := func(key string, fn func()) {
				t.Helper()
				withMounted(ctx, t, s, key, mnt, fn)
			}

			// Timings: plain Prepare against sized ones, alternating.
			const rounds = 4
			var plain, sized, sizedMount time.Duration
			for i := range rounds {
				k := strconv.Itoa(i)
				start := time.Now()
				if _, err := s.Prepare(ctx, "plain-"+k, ""); err != nil {
					t.Fatal(err)
				}
				plain += time.Since(start)
				start = time.Now()
				if _, err := s.Prepare(ctx, "sized-"+k, "", maxSize(big)); err != nil {
					t.Fatal(err)
				}
				sized += time.Since(start)
				if fs == FSTypeExt4 {
					// The alternative for ext4: grow on a private
					// mount, as xfs must.
					s.growFS = s.growOnMount
					start = time.Now()
					if _, err := s.Prepare(ctx, "sized-mount-"+k, "", maxSize(big)); err != nil {
						t.Fatal(err)
					}
					sizedMount += time.Since(start)
					s.growFS = s.fillDevice
				}
			}
			t.Logf("%s: plain Prepare %v, max-size (%d GiB) Prepare %v, each on average over %d",
				fs, plain/rounds, big>>30, sized/rounds, rounds)
			if fs == FSTypeExt4 {
				t.Logf("ext4: max-size Prepare growing on a private mount instead of offline resize2fs -f: %v", sizedMount/rounds)
			}
			withMount("plain-0", func() {
				if got := fsBytes(t, mnt); fills(got, big) || got > cfg.BaseSize {
					t.Errorf("plain snapshot has %d bytes, want the base size %d", got, cfg.BaseSize)
				}
			})
			withMount("sized-0", func() {
				if got := fsBytes(t, mnt); !fills(got, big) {
					t.Errorf("max-size snapshot has %d bytes, want about %d", got, big)
				}
				// Nothing zeroes the added metadata in the
				// background (ext4 would, 9 MB in 20 s here, 1.5%
				// of the added size in all).
				time.Sleep(15 * time.Second)
				if u, err := s.Usage(ctx, "sized-0"); err != nil || u.Size > 2<<20 {
					t.Errorf("a mounted grown filesystem left alone takes %d bytes of the pool (%v)", u.Size, err)
				}
				if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("data"), 0o644); err != nil {
					t.Fatal(err)
				}
			})
			if err := s.Commit(ctx, "sized-layer", "sized-0"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Prepare(ctx, "child", "sized-layer"); err != nil {
				t.Fatal(err)
			}
			withMount("child", func() {
				if got := fsBytes(t, mnt); !fills(got, big) {
					t.Errorf("child of a sized layer has %d bytes, want about %d", got, big)
				}
			})
			if _, err := s.Prepare(ctx, "smaller", "sized-layer", maxSize(big/2)); !errdefs.IsInvalidArgument(err) {
				t.Errorf("max-size below the parent's: %v, want InvalidArgument", err)
			}

			// Update while mounted (a running container): online.
			update := func(key string, n uint64) error {
				_, err := s.Update(ctx, snapshots.Info{Name: key, Labels: map[string]string{snapshots.LabelSnapshotMaxSize: strconv.FormatUint(n, 10)}},
					"labels."+snapshots.LabelSnapshotMaxSize)
				return err
			}
			withMount("plain-1", func() {
				if err := os.WriteFile(filepath.Join(mnt, "live"), []byte("running"), 0o644); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				if err := update("plain-1", big); err != nil {
					t.Fatal(err)
				}
				u, err := s.Usage(ctx, "plain-1")
				t.Logf("%s: online grow by Update to %d GiB: %v; the snapshot then maps %d MiB of the pool (%v)",
					fs, big>>30, time.Since(start), u.Size>>20, err)
				if got := fsBytes(t, mnt); !fills(got, big) {
					t.Errorf("after an online grow: %d bytes, want about %d", got, big)
				}
				if got, err := os.ReadFile(filepath.Join(mnt, "live")); string(got) != "running" {
					t.Errorf("file after the online grow: %q, %v", got, err)
				}
				if err := update("plain-1", big/2); !errdefs.IsInvalidArgument(err) {
					t.Errorf("lowering max-size: %v, want InvalidArgument", err)
				}
			})
			// Update while not mounted: on a private mount, left behind
			// nowhere.
			if err := update("plain-2", big); err != nil {
				t.Fatal(err)
			}
			// Offline, the new metadata is not written out in full
			// (the kernel's online ext4 resize zeroes the new inode
			// tables: several percent of the added size).
			if u, err := s.Usage(ctx, "plain-2"); err != nil || u.Size > big/100 {
				t.Errorf("an offline grow to %d bytes maps %d bytes of the pool (%v)", uint64(big), u.Size, err)
			} else {
				t.Logf("%s: offline grow by Update maps %d MiB of the pool", fs, u.Size>>20)
			}
			withMount("plain-2", func() {
				if got := fsBytes(t, mnt); !fills(got, big) {
					t.Errorf("after an offline grow: %d bytes, want about %d", got, big)
				}
			})
			if left, _ := filepath.Glob(filepath.Join(root, "grow-*")); len(left) != 0 {
				t.Errorf("grow mount points left: %v", left)
			}
		})
	}
}

// TestIntegrationLayerSharing: a layer unpacked in the default space is
// shared, not unpacked again, by a size class, and a container of the
// class on it sees the layer's files and the class's size.
func TestIntegrationLayerSharing(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	cfg.Classes = []SizeClass{{Name: "big", Size: 1 << 30}}
	s := newEmbedded(t, cfg)
	big, err := s.Class("big")
	if err != nil {
		t.Fatal(err)
	}
	ref := snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "sha256:chain1"})
	mnt := t.TempDir()
	m, err := s.Prepare(ctx, "default/1/extract", "", ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "layer-file"), []byte("from the layer"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "default/2/sha256:chain1", "default/1/extract", ref); err != nil {
		t.Fatal(err)
	}

	if _, err := big.Prepare(ctx, "default/1/extract", "", ref); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("class prepare of a held layer: %v, want AlreadyExists", err)
	}
	if s.SharedLayers() != 1 {
		t.Fatalf("shared layers %d, want 1", s.SharedLayers())
	}
	var layer string
	if err := big.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		layer = i.Name
		return nil
	}, `labels."containerd.io/snapshot.ref"==sha256:chain1,parent==""`); err != nil || layer != "default/1/extract" {
		t.Fatalf("walk for the shared layer: %q, %v", layer, err)
	}
	m, err = big.Prepare(ctx, "default/3/ctr", layer)
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "layer-file"))
	if string(got) != "from the layer" {
		t.Errorf("layer file in the class container: %q, %v", got, err)
	}
	if n := fsBytes(t, mnt); !fills(n, 1<<30) {
		t.Errorf("class container has %d bytes, want about 1 GiB", n)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
}
