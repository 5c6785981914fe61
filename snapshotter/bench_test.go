package snapshotter

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

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
			var t opTimes
			parent := ""
			i := 0
			for b.Loop() {
				key := fmt.Sprintf("active-%d", i)
				t.time("prepare", func() error { _, err := s.Prepare(ctx, key, parent); return err })
				name := fmt.Sprintf("layer-%d", i)
				t.time("commit", func() error { return s.Commit(ctx, name, key) })
				parent = name
				i++
			}
			t.report(b)
		})
		b.Run(impl.name+"/ParallelChains4", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			var t opTimes
			i := 0
			parents := make([]string, 4)
			for b.Loop() {
				var wg sync.WaitGroup
				for c := range parents {
					key := fmt.Sprintf("active-%d-%d", c, i)
					name := fmt.Sprintf("layer-%d-%d", c, i)
					wg.Go(func() {
						t.time("prepare", func() error { _, err := s.Prepare(ctx, key, parents[c]); return err })
						t.time("commit", func() error { return s.Commit(ctx, name, key) })
						parents[c] = name
					})
				}
				wg.Wait()
				i++
			}
			t.report(b)
		})
		// As containerd's bench chain: each layer gets its next layer, a
		// view and a second child, each call after the one before.
		b.Run(impl.name+"/ChainViews", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			var t opTimes
			parent := ""
			i := 0
			for b.Loop() {
				key, name := fmt.Sprintf("active-%d", i), fmt.Sprintf("layer-%d", i)
				t.time("prepare", func() error { _, err := s.Prepare(ctx, key, parent); return err })
				t.time("commit", func() error { return s.Commit(ctx, name, key) })
				if parent != "" {
					view, child := fmt.Sprintf("view-%d", i), fmt.Sprintf("child-%d", i)
					t.time("view", func() error { _, err := s.View(ctx, view, parent); return err })
					t.time("second-child", func() error { _, err := s.Prepare(ctx, child, parent); return err })
				}
				parent = name
				i++
			}
			t.report(b)
		})
		b.Run(impl.name+"/ViewRemove", func(b *testing.B) {
			ctx := context.Background()
			s := impl.open(b, b.TempDir())
			if _, err := s.Prepare(ctx, "p", ""); err != nil {
				b.Fatal(err)
			}
			if err := s.Commit(ctx, "image", "p"); err != nil {
				b.Fatal(err)
			}
			var t opTimes
			for b.Loop() {
				t.time("view", func() error { _, err := s.View(ctx, "v", "image"); return err })
				t.time("remove", func() error { return s.Remove(ctx, "v") })
			}
			t.report(b)
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
			var t opTimes
			for b.Loop() {
				t.time("prepare", func() error { _, err := s.Prepare(ctx, "container", "image"); return err })
				t.time("mounts", func() error { _, err := s.Mounts(ctx, "container"); return err })
				t.time("remove", func() error { return s.Remove(ctx, "container") })
			}
			t.report(b)
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

// opTimes collects the latency of each kind of call, reported per call in
// ms; a failed call fails the benchmark.
type opTimes struct {
	mu  sync.Mutex
	sum map[string]time.Duration
	n   map[string]int
	err error
}

func (t *opTimes) time(op string, fn func() error) {
	start := time.Now()
	err := fn()
	d := time.Since(start)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sum == nil {
		t.sum, t.n = map[string]time.Duration{}, map[string]int{}
	}
	t.sum[op] += d
	t.n[op]++
	if err != nil && t.err == nil {
		t.err = fmt.Errorf("%s: %w", op, err)
	}
}

func (t *opTimes) report(b *testing.B) {
	if t.err != nil {
		b.Fatal(t.err)
	}
	for op, d := range t.sum {
		b.ReportMetric(float64(d.Microseconds())/1000/float64(t.n[op]), op+"-ms")
	}
}
