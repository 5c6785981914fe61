package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Background work. One goroutine, the worker, does the kernel work no
// call should wait for: it finishes journaled removals, makes the warm
// devices Prepares asked for, and deletes warm devices unused for
// warmIdle. Each piece costs the kernel tens of milliseconds, and a
// snapshot call that meets it waits for the pool and the dm locks behind
// it. So the worker starts each piece in a pause between calls: none in
// flight and none for quietFor. A removal waits at most maxDefer from when
// it was journaled, so a steady stream of calls never lets the backlog
// grow.
const (
	quietFor = 50 * time.Millisecond
	maxDefer = 2 * time.Second
	// retryInterval is how often the worker retries removals that could
	// not finish (a device still open).
	retryInterval = 10 * time.Second
)

// background is the state of the background work.
type background struct {
	// calls tracks Prepare, View, Commit and Remove, which the worker
	// gives way to.
	calls activity
	// wake makes the worker run a round now.
	wake chan struct{}
	// removing holds the journal sequences of the removals being
	// finished, so the worker and a call never finish one twice.
	removing seqSet
	refill   refills
	// ahead are the warm devices being made ahead of a Prepare.
	ahead aheads
	// activating are the layers whose devices are being activated ahead
	// of their views (activateAhead).
	activating aheads
	// committing are the snapshots whose Commit is making their device
	// (commitAtOnce).
	committing pending
	// idleLayers are the layers whose views are all gone (view.go).
	idleLayers idleLayers

	// stop ends the worker, the growth watcher and the self-check, nil
	// while they do not run; wg waits for them.
	stop context.CancelFunc
	wg   sync.WaitGroup
}

// startBackground starts the worker and, for a pool that grows itself, the
// growth watcher, with a CheckInterval the self-check, and with an image
// filesystem mirror its watcher.
func (s *Snapshotter) startBackground(ctx context.Context) {
	ctx, s.bg.stop = context.WithCancel(context.WithoutCancel(ctx))
	s.bg.wg.Go(func() { s.worker(ctx) })
	s.bg.ahead.setOpen(true)
	s.bg.activating.setOpen(true)
	if s.autogrow != nil {
		s.bg.wg.Go(func() { s.watchGrowth(ctx) })
	}
	if s.cfg.CheckInterval > 0 {
		afterRecovery := s.recoveryActed()
		s.bg.wg.Go(func() { s.watchConsistency(ctx, afterRecovery) })
	}
	if s.imagefs.m != nil {
		s.bg.wg.Go(func() { s.watchImageFS(ctx) })
	}
}

// stopBackground stops the goroutines startBackground started and waits for
// them; work they began is finished first.
func (s *Snapshotter) stopBackground() {
	// Nothing is started ahead once the worker may have ended: each is
	// counted in wg while the worker still is.
	s.bg.ahead.setOpen(false)
	s.bg.activating.setOpen(false)
	if s.bg.stop != nil {
		s.bg.stop()
		s.bg.stop = nil
	}
	s.bg.wg.Wait()
}

// kick wakes the worker.
func (s *Snapshotter) kick() {
	select {
	case s.bg.wake <- struct{}{}:
	default:
	}
}

// worker runs a round when kicked and every retryInterval: it finishes
// pending removals, makes the warm devices asked for, and deactivates the
// devices of layers activated ahead beyond maxWarm. Every warmIdle/2 it
// deletes the warm devices, and deactivates the devices of layers without
// views, unused for warmIdle or over the bound. Devices whose views just
// went wait for that tick: their layers' removals often follow at once and
// do the deactivation anyway, and doing it in the middle of those calls
// only slows them.
func (s *Snapshotter) worker(ctx context.Context) {
	retry := time.NewTicker(retryInterval)
	defer retry.Stop()
	idle := time.NewTicker(warmIdle / 2)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.bg.wake:
		case <-retry.C:
		case <-idle.C:
			s.reclaimIdle(ctx)
			continue
		}
		if _, err := s.finishRemovals(ctx, true); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("pending removals not finished; will retry")
		}
		s.refillWarm(ctx)
		if s.bg.idleLayers.countAhead() > maxWarm {
			s.bg.calls.pause(ctx, time.Now().Add(maxDefer))
			if ctx.Err() != nil {
				return
			}
			// Once begun, finished even when Close stops the worker.
			s.reclaimLayers(context.WithoutCancel(ctx), s.bg.idleLayers.pickAhead())
		}
	}
}

// finishRemovals finishes the pending removals; paced, each waits for a
// pause between calls first. It returns how many it found.
func (s *Snapshotter) finishRemovals(ctx context.Context, paced bool) (int, error) {
	var pending []storage.Entry
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		entries, err := tx.Journal()
		for _, e := range entries {
			if e.Op == storage.OpDelete {
				pending = append(pending, e)
			}
		}
		return err
	}); err != nil {
		return 0, err
	}
	var errs []error
	for _, e := range pending {
		if paced {
			s.bg.calls.pause(ctx, e.Created.Add(maxDefer))
		}
		if err := s.finishDelete(ctx, e); err != nil && !errdefs.IsUnavailable(err) {
			errs = append(errs, fmt.Errorf("device %d of removed %q: %w", e.DeviceID, e.Key, err))
		}
	}
	return len(pending), errors.Join(errs...)
}

// refillWarm makes the warm devices asked for, each in a pause between
// calls, while the pool is healthy (makeWarm checks).
func (s *Snapshotter) refillWarm(ctx context.Context) {
	for parent, asks := range s.bg.refill.wanted() {
		if ctx.Err() != nil {
			return
		}
		s.bg.calls.pause(ctx, time.Now().Add(maxDefer))
		if ctx.Err() != nil {
			return
		}
		// Once begun, finished even when Close stops the worker: a
		// half-made device would stay journaled until the next start.
		if err := s.makeWarm(context.WithoutCancel(ctx), parent, false); err != nil {
			log.G(ctx).WithError(err).WithField("parent", parent).Debug("no warm device made")
		}
		s.bg.refill.done(parent, asks)
	}
}

// reclaimIdle deletes the warm devices unused for warmIdle, and deactivates
// the devices of layers whose last view went that long ago, in a pause
// between calls.
func (s *Snapshotter) reclaimIdle(ctx context.Context) {
	s.bg.calls.pause(ctx, time.Now().Add(maxDefer))
	if ctx.Err() != nil {
		return
	}
	// Once begun, finished even when Close stops the worker.
	ctx = context.WithoutCancel(ctx)
	cutoff := time.Now().Add(-warmIdle)
	s.reclaimLayers(ctx, s.bg.idleLayers.pick(func(released time.Time, newer int) bool {
		return released.Before(cutoff) || newer >= maxWarm
	}))
	err := s.reclaimWarm(ctx, func(w storage.Warm, newer int) bool {
		return w.Created.Before(cutoff) || newer >= maxWarm
	})
	if err != nil && ctx.Err() == nil {
		log.G(ctx).WithError(err).Warn("idle warm devices not deleted; will retry")
	}
}

// reclaimWarm deletes the warm devices pick chooses (see dropWarm).
func (s *Snapshotter) reclaimWarm(ctx context.Context, pick func(w storage.Warm, newer int) bool) error {
	var dels []storage.Entry
	if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		dels, err = dropWarm(tx, pick)
		return err
	}); err != nil {
		return err
	}
	return s.finishDeletes(ctx, dels)
}

// Cleanup is what containerd calls at the end of each garbage collection
// that removed snapshots. With async_remove it only wakes the worker: the
// collection's time counts the call, and containerd's scheduler waits about
// 50 times a collection's time before the next one, so kernel work here
// would delay every later removal. Without async_remove it finishes the
// removals a busy device deferred. The warm devices stay either way, or
// the next container of an image would wait for an activation after every
// other container's removal.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	if s.cfg.AsyncRemove {
		s.kick()
		return nil
	}
	_, err := s.finishRemovals(ctx, false)
	return err
}

// Drain deletes the warm devices, deactivates the devices of layers left
// without views, and finishes every pending removal now: the pool then
// holds only the snapshots' devices (an administrator's cleanup, and
// Close).
func (s *Snapshotter) Drain(ctx context.Context) error {
	s.reclaimLayers(ctx, s.bg.idleLayers.pick(func(time.Time, int) bool { return true }))
	err := s.reclaimWarm(ctx, func(storage.Warm, int) bool { return true })
	_, ferr := s.finishRemovals(ctx, false)
	return errors.Join(err, ferr)
}

// warmTaken notes that a Prepare on parent took its warm device, and asks
// for the next one unless it was parent's first child: a layer in an unpack
// gets one child (its next layer), an image's top layer many (its
// containers), and they should not wait for an activation either.
func (s *Snapshotter) warmTaken(parent string) {
	if s.bg.refill.countChild(parent) > 1 {
		s.bg.refill.ask(parent)
		s.kick()
	}
}

// warmMissed notes that a Prepare on parent found no warm device and asks
// for one: more children may follow (containers of one image).
func (s *Snapshotter) warmMissed(parent string) {
	s.bg.refill.countChild(parent)
	s.bg.refill.ask(parent)
	s.kick()
}

// warmAhead makes a warm device of committed parent at once, in a
// goroutine of its own, unless one is being made. A View of a layer is
// mostly followed by a Prepare on it (a container of an image read through
// the view), which then takes the device instead of waiting for a
// create_snap and an activation. It does not wait for a pause, so that its
// kernel steps overlap the View's activation: both wait for an RCU grace
// period, and waits at the same time share one. It is finished even when
// Close stops the background work.
func (s *Snapshotter) warmAhead(ctx context.Context, parent string) {
	s.bg.ahead.goAhead(ctx, parent, &s.bg.wg, "no warm device made ahead", func(ctx context.Context) error {
		return s.makeWarm(ctx, parent, true)
	})
}

// aheads are work begun ahead of the calls that use it, by key: warm
// devices by parent, layers activated by layer.
type aheads struct {
	mu sync.Mutex
	// open is set while the background work runs.
	open   bool
	making pending
}

func (a *aheads) setOpen(open bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.open = open
}

// start notes work on key and counts its goroutine in wg. ok is false
// when it is under way already or the background work does not run; done
// ends it.
func (a *aheads) start(key string, wg *sync.WaitGroup) (done func(), ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.open {
		return nil, false
	}
	if done, ok = a.making.start(key); ok {
		wg.Add(1)
	}
	return done, ok
}

// goAhead runs fn for key in a goroutine of its own, counted in wg, unless
// work on key is under way or the background work does not run. fn runs to
// its end even when Close stops the background work; its error is logged
// with what.
func (a *aheads) goAhead(ctx context.Context, key string, wg *sync.WaitGroup, what string, fn func(context.Context) error) {
	done, ok := a.start(key, wg)
	if !ok {
		return
	}
	go func() {
		defer wg.Done()
		defer done()
		ctx := context.WithoutCancel(ctx)
		if err := fn(ctx); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Debug(what)
		}
	}()
}

// wait waits until no work on key is under way, or ctx ends.
func (a *aheads) wait(ctx context.Context, key string) error {
	return a.making.wait(ctx, key)
}

// pending are the keys with work in flight that calls wait for.
type pending struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

// start notes work on key; done ends it. ok is false, and done a no-op,
// when work on key is in flight already.
func (p *pending) start(key string) (done func(), ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m[key] != nil {
		return func() {}, false
	}
	if p.m == nil {
		p.m = map[string]chan struct{}{}
	}
	ch := make(chan struct{})
	p.m[key] = ch
	return func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.m, key)
		close(ch)
	}, true
}

// acquire waits for work on key in flight, then starts its own; done ends
// it.
func (p *pending) acquire(ctx context.Context, key string) (done func(), err error) {
	for {
		if done, ok := p.start(key); ok {
			return done, nil
		}
		if err := p.wait(ctx, key); err != nil {
			return nil, err
		}
	}
}

// wait waits until no work on key is in flight, or ctx ends.
func (p *pending) wait(ctx context.Context, key string) error {
	p.mu.Lock()
	ch := p.m[key]
	p.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// maxChildCounts bounds the map of Prepares per parent: past it, the
// counts start again.
const maxChildCounts = 4096

// refills are the committed snapshots whose next child should find a warm
// device, for the worker to make.
type refills struct {
	mu sync.Mutex
	// want counts the requests per committed snapshot since its last
	// refill; an entry goes once a refill has run after its last request.
	want map[string]int
	// children counts the Prepares on each committed snapshot.
	children map[string]int
}

// ask requests a warm device of parent.
func (r *refills) ask(parent string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.want == nil {
		r.want = map[string]int{}
	}
	r.want[parent]++
}

// wanted returns the parents asked for, with their request counts.
func (r *refills) wanted() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.want)
}

// done forgets parent after a refill that saw asks requests, unless it was
// asked for again meanwhile.
func (r *refills) done(parent string, asks int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.want[parent] == asks {
		delete(r.want, parent)
	}
}

// countChild counts a Prepare on parent and returns how many it made.
func (r *refills) countChild(parent string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.children == nil || len(r.children) >= maxChildCounts {
		r.children = map[string]int{}
	}
	r.children[parent]++
	return r.children[parent]
}

// seqSet is a set of journal sequences, safe for concurrent use.
type seqSet struct {
	mu  sync.Mutex
	set map[uint64]bool
}

// add adds seq and reports whether it was not there yet.
func (q *seqSet) add(seq uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.set[seq] {
		return false
	}
	if q.set == nil {
		q.set = map[uint64]bool{}
	}
	q.set[seq] = true
	return true
}

func (q *seqSet) remove(seq uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.set, seq)
}

// activity tracks the snapshot calls that change the pool.
type activity struct {
	inFlight atomic.Int64
	last     atomic.Int64 // when the latest call ended, Unix nanoseconds
}

// begin counts a call in; the returned func counts it out.
func (a *activity) begin() func() {
	a.inFlight.Add(1)
	return func() {
		a.last.Store(time.Now().UnixNano())
		a.inFlight.Add(-1)
	}
}

// pause waits until no call has run for quietFor, or until deadline, or
// ctx ends.
func (a *activity) pause(ctx context.Context, deadline time.Time) {
	for {
		now := time.Now()
		if !now.Before(deadline) {
			return
		}
		wait := quietFor - now.Sub(time.Unix(0, a.last.Load()))
		if a.inFlight.Load() > 0 {
			wait = quietFor
		}
		if wait <= 0 {
			return
		}
		t := time.NewTimer(min(wait, deadline.Sub(now)))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
