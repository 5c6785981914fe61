package snapshotter

import (
	"context"
	"fmt"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// The per-call costs containerd sees while unpacking an image (Prepare then
// Commit per layer), starting a container (Prepare, Mounts) and deleting it
// (Remove), on thin devices and, as the yardstick, on containerd's
// overlayfs snapshotter in the same run. Compare ratios, not absolute
// times: the VM is 5-20x slower than a real machine.
func BenchmarkSnapshotter(b *testing.B) {
	dmtest.Require(b)
	impls := []struct {
		name string
		open func(b *testing.B, root string) snapshots.Snapshotter
	}{
		{"thin", func(b *testing.B, root string) snapshots.Snapshotter {
			s, err := New(context.Background(), testConfig(root))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() {
				s.Close()
				if err := destroy(root); err != nil {
					b.Error(err)
				}
			})
			return s
		}},
		{"overlayfs", func(b *testing.B, root string) snapshots.Snapshotter {
			s, err := overlay.NewSnapshotter(root)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			return s
		}},
	}
	for _, impl := range impls {
		b.Run(impl.name+"/PrepareCommitChain", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			parent := ""
			i := 0
			for b.Loop() {
				key := fmt.Sprintf("active-%d", i)
				if _, err := s.Prepare(ctx, key, parent); err != nil {
					b.Fatal(err)
				}
				name := fmt.Sprintf("layer-%d", i)
				if err := s.Commit(ctx, name, key); err != nil {
					b.Fatal(err)
				}
				parent = name
				i++
			}
		})
		b.Run(impl.name+"/PrepareRemove", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			if _, err := s.Prepare(ctx, "p", ""); err != nil {
				b.Fatal(err)
			}
			if err := s.Commit(ctx, "image", "p"); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := s.Prepare(ctx, "container", "image"); err != nil {
					b.Fatal(err)
				}
				if _, err := s.Mounts(ctx, "container"); err != nil {
					b.Fatal(err)
				}
				if err := s.Remove(ctx, "container"); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(impl.name+"/Usage", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			if _, err := s.Prepare(ctx, "a", ""); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := s.Usage(ctx, "a"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
