package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
)

// drainTimeout bounds waiting for the garbage collector after removing
// many snapshots at once.
const drainTimeout = 30 * time.Minute

func chainKey(kind string, chain, i int) string { return fmt.Sprintf("%s-%d-%03d", kind, chain, i) }

// parallelDo runs fn(0..n-1) at once and returns their errors joined.
func parallelDo(n int, fn func(i int) error) error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = fn(i) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// removeAndWait removes key through containerd and records the call, then
// waits until the backend no longer holds it and records that too.
//
// containerd's GC scheduler drops a deletion that happens while a
// collection runs (its event is older than the collection's end), and then
// collects only after 100 more mutations: removing back to back, the next
// Remove could wait for minutes. So each Remove waits gcSettle after the
// previous backend removal; if a removal still is not collected within
// gcTimeout, a forced collection finishes it, counted in the notes and
// not in the samples.
func (b *bench) removeAndWait(sn, kind, key string) error {
	gone, err := b.be[sn].watch(b.ctx, key)
	if err != nil {
		return err
	}
	time.Sleep(b.cfg.gcSettle)
	start := time.Now()
	if err := b.timed(sn, "Remove "+kind, func() error { return b.sn[sn].Remove(b.ctx, key) }); err != nil {
		return err
	}
	what := fmt.Sprintf("%s: backend removal of %s", sn, key)
	err = pollUntil(b.ctx, b.cfg.gcTimeout, b.be[sn].interval(), what, gone)
	if errors.Is(err, errTimeout) {
		b.forced(sn)
		if err := b.collect(); err != nil {
			return err
		}
		return pollUntil(b.ctx, b.cfg.gcTimeout, b.be[sn].interval(), what+" after a forced collection", gone)
	}
	if err != nil {
		return err
	}
	b.add(sn, "Remove "+kind+" +GC", time.Since(start))
	return nil
}

// forced counts a removal that containerd's GC scheduler left behind.
func (b *bench) forced(sn string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.forcedGC == nil {
		b.forcedGC = map[string]int{}
	}
	b.forcedGC[sn]++
}

// collect makes containerd collect garbage now and waits for it, as
// `ctr images rm --sync` does: a lease deleted synchronously.
func (b *bench) collect() error {
	l, err := b.lm.Create(b.nsCtx, leases.WithRandomID())
	if err != nil {
		return err
	}
	return b.lm.Delete(b.nsCtx, l, leases.SynchronousDelete)
}

// drain makes containerd collect garbage until the backend holds at most
// n snapshots, and returns how long that took.
func (b *bench) drain(sn string, n int) (time.Duration, error) {
	start := time.Now()
	err := pollUntil(b.ctx, drainTimeout, 20*time.Millisecond, sn+": backend drain", func(ctx context.Context) (bool, error) {
		c, err := b.be[sn].count(ctx)
		if err != nil || c <= n {
			return err == nil, err
		}
		return false, b.collect()
	})
	return time.Since(start), err
}

// chain: a chain of layers, each Prepared, Mounted and Committed; a view
// and an active snapshot on every layer; Usage, Stat, Walk; then every
// snapshot removed one by one, each waited for in the backend.
func (b *bench) chain(sn string) error {
	s, ctx, layers := b.sn[sn], b.ctx, b.cfg.sizes(sn).Layers
	base, err := b.be[sn].count(ctx)
	if err != nil {
		return err
	}
	var committed, views, actives []string
	parent := ""
	for i := range layers {
		a, c := chainKey("chain-active", 0, i), chainKey("chain-layer", 0, i)
		if err := b.timed(sn, "Prepare", func() error { _, err := s.Prepare(ctx, a, parent); return err }); err != nil {
			return err
		}
		if err := b.timed(sn, "Mounts", func() error { _, err := s.Mounts(ctx, a); return err }); err != nil {
			return err
		}
		if err := b.timed(sn, "Commit", func() error { return s.Commit(ctx, c, a) }); err != nil {
			return err
		}
		committed = append(committed, c)
		parent = c
	}
	for i, c := range committed {
		v, w := chainKey("chain-view", 0, i), chainKey("chain-container", 0, i)
		if err := b.timed(sn, "View", func() error { _, err := s.View(ctx, v, c); return err }); err != nil {
			return err
		}
		if err := b.timed(sn, "Mounts", func() error { _, err := s.Mounts(ctx, v); return err }); err != nil {
			return err
		}
		if err := b.timed(sn, "Prepare", func() error { _, err := s.Prepare(ctx, w, c); return err }); err != nil {
			return err
		}
		if err := b.timed(sn, "Mounts", func() error { _, err := s.Mounts(ctx, w); return err }); err != nil {
			return err
		}
		views, actives = append(views, v), append(actives, w)
	}
	for i := range committed {
		for _, k := range []string{committed[i], actives[i]} {
			if err := b.timed(sn, "Usage", func() error { _, err := s.Usage(ctx, k); return err }); err != nil {
				return err
			}
		}
		for _, k := range []string{committed[i], actives[i], views[i]} {
			if err := b.timed(sn, "Stat", func() error { _, err := s.Stat(ctx, k); return err }); err != nil {
				return err
			}
		}
	}
	for range b.cfg.walks {
		n := 0
		if err := b.timed(sn, "Walk", func() error {
			return s.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil })
		}); err != nil {
			return err
		}
		if n != 3*layers {
			return fmt.Errorf("walk saw %d snapshots, want %d", n, 3*layers)
		}
	}
	for _, v := range views {
		if err := b.removeAndWait(sn, "view", v); err != nil {
			return err
		}
	}
	for _, a := range actives {
		if err := b.removeAndWait(sn, "active", a); err != nil {
			return err
		}
	}
	for _, c := range slices.Backward(committed) {
		if err := b.removeAndWait(sn, "committed", c); err != nil {
			return err
		}
	}
	_, err = b.drain(sn, base)
	return err
}

// parallel: several chains built at once (Prepare, Mounts, Commit, View,
// Usage, Stat per layer) while another client Walks, then all removed at
// once.
func (b *bench) parallel(sn string) error {
	s, ctx, layers, n := b.sn[sn], b.ctx, b.cfg.sizes(sn).Layers, b.cfg.sizes(sn).Chains
	const suffix = " (chains at once)"
	base, err := b.be[sn].count(ctx)
	if err != nil {
		return err
	}
	committed := make([][]string, n)
	views := make([][]string, n)
	done := make(chan struct{})
	walkErr := make(chan error, 1)
	go func() {
		for first := true; ; first = false {
			select {
			case <-done:
				if !first {
					walkErr <- nil
					return
				}
			default:
			}
			if err := b.timed(sn, "Walk"+suffix, func() error {
				return s.Walk(ctx, func(context.Context, snapshots.Info) error { return nil })
			}); err != nil {
				walkErr <- err
				return
			}
			// A client that lists now and then, not a busy loop.
			time.Sleep(20 * time.Millisecond)
		}
	}()
	err = parallelDo(n, func(ch int) error {
		parent := ""
		for i := range layers {
			a, c, v := chainKey("par-active", ch, i), chainKey("par-layer", ch, i), chainKey("par-view", ch, i)
			steps := []struct {
				op string
				fn func() error
			}{
				{"Prepare", func() error { _, err := s.Prepare(ctx, a, parent); return err }},
				{"Mounts", func() error { _, err := s.Mounts(ctx, a); return err }},
				{"Commit", func() error { return s.Commit(ctx, c, a) }},
				{"View", func() error { _, err := s.View(ctx, v, c); return err }},
				{"Usage", func() error { _, err := s.Usage(ctx, c); return err }},
				{"Stat", func() error { _, err := s.Stat(ctx, c); return err }},
			}
			for _, st := range steps {
				if err := b.timed(sn, st.op+suffix, st.fn); err != nil {
					return err
				}
			}
			committed[ch] = append(committed[ch], c)
			views[ch] = append(views[ch], v)
			parent = c
		}
		return nil
	})
	close(done)
	if werr := <-walkErr; err == nil {
		err = werr
	}
	if err != nil {
		return err
	}
	err = parallelDo(n, func(ch int) error {
		for _, v := range views[ch] {
			if err := b.timed(sn, "Remove view"+suffix, func() error { return s.Remove(ctx, v) }); err != nil {
				return err
			}
		}
		for _, v := range slices.Backward(committed[ch]) {
			if err := b.timed(sn, "Remove committed"+suffix, func() error { return s.Remove(ctx, v) }); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	d, err := b.drain(sn, base)
	if err != nil {
		return err
	}
	b.add(sn, "parallel removal: until backend empty (forced GC)", d)
	return nil
}

// imageWorkload: ctr images import (with unpack) and ctr run --rm, then
// container snapshots prepared on the image's top layer all at once and
// removed all at once.
func (b *bench) imageWorkload(sn string) error {
	sz, ctx := b.cfg.sizes(sn), b.ctx
	base, err := b.be[sn].count(ctx)
	if err != nil {
		return err
	}
	ctrCtx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	removeImage := func() error {
		start := time.Now()
		if _, err := b.ctr(ctrCtx, "images", "rm", "--sync", b.image.ref); err != nil {
			return err
		}
		if _, err := b.drain(sn, base); err != nil {
			return err
		}
		b.add(sn, "ctr images rm --sync, until backend empty", time.Since(start))
		return nil
	}
	for i := range sz.Imports {
		if err := b.timed(sn, "ctr images import (unpack)", func() error {
			_, err := b.ctr(ctrCtx, "images", "import", "--snapshotter", sn, b.image.tar)
			return err
		}); err != nil {
			return err
		}
		if i < sz.Imports-1 {
			if err := removeImage(); err != nil {
				return err
			}
		}
	}
	top := b.image.chainIDs[len(b.image.chainIDs)-1]
	if _, err := b.sn[sn].Stat(ctx, top); err != nil {
		return fmt.Errorf("the image's top layer after import: %w", err)
	}
	for i := range sz.Runs {
		if err := b.timed(sn, "ctr run --rm /bin/true", func() error {
			_, err := b.ctr(ctrCtx, "run", "--rm", "--snapshotter", sn, b.image.ref, fmt.Sprintf("bench-run-%d", i), "/bin/true")
			return err
		}); err != nil {
			return err
		}
	}
	if err := b.containers(sn, top); err != nil {
		return err
	}
	return removeImage()
}

// containers prepares (and mounts) cfg.containers snapshots on top at
// once, then removes them at once.
func (b *bench) containers(sn, top string) error {
	s, ctx, n := b.sn[sn], b.ctx, b.cfg.containers
	const suffix = " (containers at once)"
	key := func(i int) string { return fmt.Sprintf("container-%02d", i) }
	start := time.Now()
	err := parallelDo(n, func(i int) error {
		if err := b.timed(sn, "Prepare"+suffix, func() error { _, err := s.Prepare(ctx, key(i), top); return err }); err != nil {
			return err
		}
		return b.timed(sn, "Mounts"+suffix, func() error { _, err := s.Mounts(ctx, key(i)); return err })
	})
	if err != nil {
		return err
	}
	b.add(sn, "all containers Prepare+Mounts (wall)", time.Since(start))
	start = time.Now()
	if err := parallelDo(n, func(i int) error {
		return b.timed(sn, "Remove"+suffix, func() error { return s.Remove(ctx, key(i)) })
	}); err != nil {
		return err
	}
	b.add(sn, "all containers Remove (wall)", time.Since(start))
	return nil
}

// scale: Prepare, Commit and Remove with one existing snapshot, and again
// with Scale committed snapshots in place.
func (b *bench) scale(sn string) error {
	s, ctx, sz := b.sn[sn], b.ctx, b.cfg.sizes(sn)
	base, err := b.be[sn].count(ctx)
	if err != nil {
		return err
	}
	if _, err := s.Prepare(ctx, "scale-base-active", ""); err != nil {
		return err
	}
	if err := s.Commit(ctx, "scale-base", "scale-base-active"); err != nil {
		return err
	}
	measure := func(label string) error {
		for it := range sz.ScaleIters {
			a, c := fmt.Sprintf("scale-%s-active-%d", label, it), fmt.Sprintf("scale-%s-layer-%d", label, it)
			if err := b.timed(sn, "Prepare, "+label+" existing", func() error { _, err := s.Prepare(ctx, a, "scale-base"); return err }); err != nil {
				return err
			}
			if err := b.timed(sn, "Commit, "+label+" existing", func() error { return s.Commit(ctx, c, a) }); err != nil {
				return err
			}
			// Waited for in the backend: containerd's GC walks all
			// snapshots, and the next call should not queue behind it.
			if err := b.removeAndWait(sn, "committed, "+label+" existing", c); err != nil {
				return err
			}
		}
		return nil
	}
	if err := measure("1"); err != nil {
		return err
	}
	// Scale committed snapshots in chains of 10 on the base, made by
	// fillPar clients at once.
	const depth = 10
	par := b.cfg.fillPar
	start := time.Now()
	var count atomic.Int64
	made := make([][]string, par)
	err = parallelDo(par, func(g int) error {
		parent := "scale-base"
		for i := g; i < sz.Scale; i += par {
			if (i/par)%depth == 0 {
				parent = "scale-base"
			}
			a, c := fmt.Sprintf("fill-active-%d", i), fmt.Sprintf("fill-layer-%d", i)
			if err := b.timed(sn, fmt.Sprintf("fill: Prepare+Commit (%d at once)", par), func() error {
				if _, err := s.Prepare(ctx, a, parent); err != nil {
					return err
				}
				return s.Commit(ctx, c, a)
			}); err != nil {
				return err
			}
			made[g] = append(made[g], c)
			parent = c
			if n := count.Add(1); n%250 == 0 {
				logf("scale on %s: %d of %d snapshots made", sn, n, sz.Scale)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	b.note("scale on %s: %d snapshots made in %s", sn, sz.Scale, time.Since(start).Round(100*time.Millisecond))
	if err := measure("N"); err != nil {
		return err
	}
	// Removed and collected before the next snapshotter's turn: records
	// left in containerd's metadata slow its every transaction and its
	// GC, whichever snapshotter they belong to.
	start = time.Now()
	if err := parallelDo(par, func(g int) error {
		for _, v := range slices.Backward(made[g]) {
			if err := b.timed(sn, fmt.Sprintf("cleanup: Remove (%d at once)", par), func() error { return s.Remove(ctx, v) }); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	if err := s.Remove(ctx, "scale-base"); err != nil {
		return err
	}
	removed := time.Since(start)
	d, err := b.drain(sn, base)
	if err != nil {
		return err
	}
	b.note("scale on %s: %d snapshots removed in %s, backend empty %s later", sn, sz.Scale+1, removed.Round(100*time.Millisecond), d.Round(100*time.Millisecond))
	return nil
}
