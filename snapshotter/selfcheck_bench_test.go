//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// BenchmarkSelfCheckStall: what the check costs snapshot calls. The same
// loop of Prepare, Commit and Remove (an unpack's steps and a cleanup's)
// runs on a pool of 60 layers alone, then with check passes back to back
// beside it, far more often than check_interval would. Each call's
// latency is reported as p50, p99 and max in ms, and so are a pass's and
// its hold of poolMu (what a call can wait for); passes/op is how many
// passes ended per iteration.
func BenchmarkSelfCheckStall(b *testing.B) {
	dmtest.Require(b)
	for _, withCheck := range []bool{false, true} {
		name := map[bool]string{false: "alone", true: "with-check"}[withCheck]
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			root := b.TempDir()
			s, err := New(ctx, testConfig(root))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() {
				s.Close()
				if err := destroy(root); err != nil {
					b.Error(err)
				}
			})
			parent := ""
			for i := range 60 {
				name := fmt.Sprintf("layer-%d", i)
				if _, err := s.Prepare(ctx, "active-"+name, parent); err != nil {
					b.Fatal(err)
				}
				if err := s.Commit(ctx, name, "active-"+name); err != nil {
					b.Fatal(err)
				}
				parent = name
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var checks latencies // one pass and its hold of poolMu
			if withCheck {
				wg.Go(func() { checkUntil(ctx, b, s, stop, &checks) })
			}
			stopChecks := sync.OnceFunc(func() {
				close(stop)
				wg.Wait()
			})
			defer stopChecks()
			var lat latencies
			i := 0
			for b.Loop() {
				key, name := fmt.Sprintf("c-%d", i), fmt.Sprintf("l-%d", i)
				if err := errors.Join(
					lat.time("prepare", func() error { _, err := s.Prepare(ctx, key, parent); return err }),
					lat.time("commit", func() error { return s.Commit(ctx, name, key) }),
					lat.time("remove", func() error { return s.Remove(ctx, name) }),
				); err != nil {
					b.Fatal(err)
				}
				i++
			}
			stopChecks()
			lat.report(b)
			if withCheck {
				checks.report(b)
				b.ReportMetric(float64(len(checks["check-pass"]))/float64(i), "passes/op")
			}
		})
	}
}

// checkUntil runs check passes back to back, as CheckOnline makes them,
// until stop, timing each pass and its hold of poolMu.
func checkUntil(ctx context.Context, b *testing.B, s *Snapshotter, stop chan struct{}, t *latencies) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		var st *checkState
		if err := t.time("check-pass", func() (err error) {
			s.checkMu.Lock()
			defer s.checkMu.Unlock()
			_, st, err = s.checkOnce(ctx)
			return err
		}); err != nil {
			b.Error(err)
			return
		}
		t.add("check-pool-lock", st.poolLocked)
	}
}

// latencies keeps every call's time, by kind of call.
type latencies map[string][]time.Duration

// time runs fn, the call op, and keeps its time; an error is returned.
func (l *latencies) time(op string, fn func() error) error {
	start := time.Now()
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	l.add(op, time.Since(start))
	return nil
}

func (l *latencies) add(op string, d time.Duration) {
	if *l == nil {
		*l = latencies{}
	}
	(*l)[op] = append((*l)[op], d)
}

func (l latencies) report(b *testing.B) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for op, ds := range l {
		slices.Sort(ds)
		b.ReportMetric(ms(ds[len(ds)/2]), op+"-p50-ms")
		b.ReportMetric(ms(ds[len(ds)*99/100]), op+"-p99-ms")
		b.ReportMetric(ms(ds[len(ds)-1]), op+"-max-ms")
	}
}
