package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// TestIntegrationSizeGRPC drives the per-container disk size through the
// sockets, with the labels containerd sends: max-size at Prepare and on
// Update (online), a size class on its own socket with its own keys, and
// layers shared by chain id across containerd namespaces and classes.
func TestIntegrationSizeGRPC(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := shortTempDir(t)
	const classSize = 1 << 30
	var daemonRoot string
	factory := func(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error) {
		sc := cfg.Snapshotter()
		sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
		daemonRoot = cfg.Root
		return snapshotter.New(ctx, sc)
	}
	t.Cleanup(func() {
		if daemonRoot == "" {
			return
		}
		pool, err := snapshotter.LoopPoolName(daemonRoot)
		if err == nil {
			err = dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(daemonRoot, "pool"))
		}
		if err != nil {
			t.Error(err)
		}
	})
	main, stop, err := serveForTest(ctx, root, factory, func(c *config.Config) {
		c.Snapshot.BaseSize = 64 << 20
		c.Classes = []config.ClassConfig{{Name: "thin-1g", Size: classSize}}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	}()
	// The class's socket is next to the main one by default.
	class := dialSnapshotter(t, filepath.Join(root, "thin-1g.sock"))

	mnt := t.TempDir()
	mounted := func(sn snapshots.Snapshotter, key string, fn func()) {
		t.Helper()
		m, err := sn.Mounts(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if err := mount.All(m, mnt); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := mount.UnmountAll(mnt, 0); err != nil {
				t.Fatal(err)
			}
		}()
		fn()
	}
	size := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * uint64(st.Bsize)
	}
	about := func(what string, got, want uint64) {
		t.Helper()
		if got > want || got < want/100*90 {
			t.Errorf("%s: filesystem of %d bytes, want about %d", what, got, want)
		}
	}
	labels := func(kv ...string) snapshots.Opt {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return snapshots.WithLabels(m)
	}
	maxSize := func(n uint64) snapshots.Opt {
		return labels(snapshots.LabelSnapshotMaxSize, strconv.FormatUint(n, 10))
	}

	// max-size at Prepare, then raised on Update while mounted.
	if _, err := main.Prepare(ctx, "c1", "", maxSize(512<<20)); err != nil {
		t.Fatal(err)
	}
	mounted(main, "c1", func() {
		about("max-size Prepare", size(), 512<<20)
		if _, err := main.Update(ctx, snapshots.Info{Name: "c1", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: strconv.Itoa(1 << 30)}},
			"labels."+snapshots.LabelSnapshotMaxSize); err != nil {
			t.Fatal(err)
		}
		about("Update while mounted", size(), 1<<30)
		_, err := main.Update(ctx, snapshots.Info{Name: "c1", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: strconv.Itoa(256 << 20)}},
			"labels."+snapshots.LabelSnapshotMaxSize)
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("lowering max-size: %v, want InvalidArgument", err)
		}
	})
	if _, err := main.Prepare(ctx, "bad", "", labels(snapshots.LabelSnapshotMaxSize, "1G")); !errdefs.IsInvalidArgument(err) {
		t.Errorf("invalid max-size: %v, want InvalidArgument", err)
	}

	// On the class's socket, the same key as on the main socket names a
	// snapshot of its own, of the class's size.
	if _, err := class.Prepare(ctx, "c1", ""); err != nil {
		t.Fatal(err)
	}
	mounted(class, "c1", func() { about("class Prepare", size(), classSize) })
	keys := func(sn snapshots.Snapshotter) (out []string) {
		if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { out = append(out, i.Name); return nil }); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if got := keys(class); len(got) != 1 || got[0] != "c1" {
		t.Errorf("class lists %v, want [c1]", got)
	}
	if err := class.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := main.Stat(ctx, "c1"); err != nil {
		t.Errorf("removing the class's c1 touched the main one: %v", err)
	}

	// Layer sharing, as containerd's unpacker and metadata store do it:
	// Prepare with the chain id; on AlreadyExists, Walk for a committed
	// snapshot with that label and the expected parent.
	const chain = "sha256:0123abcd"
	ref := labels(snapshots.LabelSnapshotRef, chain)
	if _, err := main.Prepare(ctx, "default/1/extract-1 "+chain, "", ref); err != nil {
		t.Fatal(err)
	}
	mounted(main, "default/1/extract-1 "+chain, func() {
		if err := os.WriteFile(filepath.Join(mnt, "from-layer"), []byte("unpacked once"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err := main.Commit(ctx, "default/2/"+chain, "default/1/extract-1 "+chain, ref); err != nil {
		t.Fatal(err)
	}
	find := func(sn snapshots.Snapshotter, parent string) string {
		t.Helper()
		var name string
		filter := `labels."` + snapshots.LabelSnapshotRef + `"==` + chain + `,parent=="` + parent + `"`
		if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
			if i.Kind == snapshots.KindCommitted {
				name = i.Name
			}
			return nil
		}, filter); err != nil {
			t.Fatal(err)
		}
		return name
	}
	// Namespace k8s.io on the same socket: the layer is there already.
	if _, err := main.Prepare(ctx, "k8s.io/3/extract-2 "+chain, "", ref); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second namespace's unpack: %v, want AlreadyExists", err)
	}
	if got := find(main, ""); got != "default/2/"+chain {
		t.Errorf("second namespace finds %q", got)
	}
	// The class: a committed snapshot of its own on the same blocks.
	if _, err := class.Prepare(ctx, "k8s.io/4/extract-3 "+chain, "", ref); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("class unpack: %v, want AlreadyExists", err)
	}
	layer := find(class, "")
	if layer == "" {
		t.Fatal("class finds no shared layer")
	}
	if _, err := class.Prepare(ctx, "k8s.io/5/ctr", layer); err != nil {
		t.Fatal(err)
	}
	mounted(class, "k8s.io/5/ctr", func() {
		about("class container on a shared layer", size(), classSize)
		if got, err := os.ReadFile(filepath.Join(mnt, "from-layer")); string(got) != "unpacked once" {
			t.Errorf("layer file in the class container: %q, %v", got, err)
		}
	})
}
