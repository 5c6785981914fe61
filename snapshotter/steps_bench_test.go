package snapshotter

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// timedPool adds up the time of every pool call by method.
type timedPool struct {
	thinPool
	mu  sync.Mutex
	sum map[string]time.Duration
	n   map[string]int
}

func (p *timedPool) time(op string, start time.Time) {
	d := time.Since(start)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sum[op] += d
	p.n[op]++
}

// take returns and resets the totals as "op n×avg" sorted by total.
func (p *timedPool) take() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	ops := make([]string, 0, len(p.sum))
	for op := range p.sum {
		ops = append(ops, op)
	}
	sort.Slice(ops, func(i, j int) bool { return p.sum[ops[i]] > p.sum[ops[j]] })
	var b strings.Builder
	for _, op := range ops {
		fmt.Fprintf(&b, " %s %d×%.2fms", op, p.n[op], float64(p.sum[op].Microseconds())/1000/float64(p.n[op]))
	}
	p.sum, p.n = map[string]time.Duration{}, map[string]int{}
	return b.String()
}

func (p *timedPool) CreateSnap(id, origin uint32) error {
	defer p.time("create_snap", time.Now())
	return p.thinPool.CreateSnap(id, origin)
}
func (p *timedPool) DeleteThin(id uint32) error {
	defer p.time("delete", time.Now())
	return p.thinPool.DeleteThin(id)
}
func (p *timedPool) SetTransactionID(old, next uint64) error {
	defer p.time("set_txid", time.Now())
	return p.thinPool.SetTransactionID(old, next)
}
func (p *timedPool) Activate(name string, id uint32, length dmsetup.Sectors, ro bool) error {
	defer p.time("activate", time.Now())
	return p.thinPool.Activate(name, id, length, ro)
}
func (p *timedPool) Deactivate(ctx context.Context, name string) error {
	defer p.time("deactivate", time.Now())
	return p.thinPool.Deactivate(ctx, name)
}
func (p *timedPool) Suspend(name string) error {
	defer p.time("suspend", time.Now())
	return p.thinPool.Suspend(name)
}
func (p *timedPool) Resume(name string) error {
	defer p.time("resume", time.Now())
	return p.thinPool.Resume(name)
}
func (p *timedPool) Info(name string) (dmsetup.Info, error) {
	defer p.time("info", time.Now())
	return p.thinPool.Info(name)
}
func (p *timedPool) ThinStatus(name string) (dmsetup.ThinStatus, error) {
	defer p.time("thin_status", time.Now())
	return p.thinPool.ThinStatus(name)
}
func (p *timedPool) Status() (dmsetup.PoolStatus, error) {
	defer p.time("pool_status", time.Now())
	return p.thinPool.Status()
}

// BenchmarkSteps logs where each call's time goes: the pool steps it made
// (count × average) and the call's own average, for a 20-layer chain, a view
// and a container's prepare and remove. It runs the calls in order, once
// per layer; b.N only repeats the whole.
func BenchmarkSteps(b *testing.B) {
	dmtest.Require(b)
	ctx := context.Background()
	for b.Loop() {
		root := b.TempDir()
		s, err := New(ctx, testConfig(root))
		if err != nil {
			b.Fatal(err)
		}
		tp := &timedPool{thinPool: s.pool, sum: map[string]time.Duration{}, n: map[string]int{}}
		s.poolMu.Lock()
		s.pool = tp
		s.poolMu.Unlock()
		calls := map[string]time.Duration{}
		steps := map[string]string{}
		n := map[string]int{}
		run := func(op string, fn func() error) {
			start := time.Now()
			if err := fn(); err != nil {
				b.Fatalf("%s: %v", op, err)
			}
			calls[op] += time.Since(start)
			n[op]++
		}
		const layers = 20
		parent := ""
		for i := range layers {
			key, name := fmt.Sprintf("a%d", i), fmt.Sprintf("l%d", i)
			run("prepare-chain", func() error { _, err := s.Prepare(ctx, key, parent); return err })
			run("commit", func() error { return s.Commit(ctx, name, key) })
			parent = name
		}
		steps["prepare-chain+commit"] = tp.take()
		for i := range layers {
			run("view", func() error { _, err := s.View(ctx, fmt.Sprintf("v%d", i), fmt.Sprintf("l%d", i)); return err })
		}
		steps["view"] = tp.take()
		for i := range layers {
			run("remove-view", func() error { return s.Remove(ctx, fmt.Sprintf("v%d", i)) })
		}
		steps["remove-view"] = tp.take()
		for i := range layers {
			run("prepare-cold", func() error { _, err := s.Prepare(ctx, fmt.Sprintf("c%d", i), parent); return err })
		}
		steps["prepare-cold"] = tp.take()
		for i := range layers {
			run("usage", func() error { _, err := s.Usage(ctx, fmt.Sprintf("c%d", i)); return err })
		}
		steps["usage"] = tp.take()
		for i := range layers {
			run("remove-active", func() error { return s.Remove(ctx, fmt.Sprintf("c%d", i)) })
		}
		steps["remove-active"] = tp.take()
		for i := layers - 1; i >= 0; i-- {
			run("remove-committed", func() error { return s.Remove(ctx, fmt.Sprintf("l%d", i)) })
		}
		steps["remove-committed"] = tp.take()
		for op, d := range calls {
			fmt.Fprintf(os.Stderr, "%-16s %7.2f ms/call\n", op, float64(d.Microseconds())/1000/float64(n[op]))
		}
		for k, v := range steps {
			fmt.Fprintf(os.Stderr, "steps %s:%s\n", k, v)
		}
		s.Close()
		if err := destroy(root); err != nil {
			b.Error(err)
		}
	}
}
