//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// BenchmarkSelfCheckStall: what the check costs snapshot calls. The same
// loop of Prepare, Commit and Remove (an unpack's steps and a cleanup's)
// runs on a pool of 60 layers alone, then with online checks back to back
// beside it, far more often than check_interval would. Each call's
// latency is reported as p50, p99 and max in ms; checks/op is how many
// checks ended per iteration.
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
			var checks atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			if withCheck {
				wg.Go(func() {
					for {
						select {
						case <-stop:
							return
						default:
						}
						if _, err := s.CheckOnline(ctx); err != nil {
							b.Error(err)
							return
						}
						checks.Add(1)
					}
				})
			}
			var lat latencies
			i := 0
			for b.Loop() {
				key, name := fmt.Sprintf("c-%d", i), fmt.Sprintf("l-%d", i)
				lat.time(b, "prepare", func() error { _, err := s.Prepare(ctx, key, parent); return err })
				lat.time(b, "commit", func() error { return s.Commit(ctx, name, key) })
				lat.time(b, "remove", func() error { return s.Remove(ctx, name) })
				i++
			}
			close(stop)
			wg.Wait()
			lat.report(b)
			b.ReportMetric(float64(checks.Load())/float64(i), "checks/op")
		})
	}
}

// latencies keeps every call's time, by kind of call.
type latencies map[string][]time.Duration

func (l *latencies) time(b *testing.B, op string, fn func() error) {
	start := time.Now()
	if err := fn(); err != nil {
		b.Fatalf("%s: %v", op, err)
	}
	if *l == nil {
		*l = latencies{}
	}
	(*l)[op] = append((*l)[op], time.Since(start))
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
