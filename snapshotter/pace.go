package snapshotter

import (
	"context"
	"sync/atomic"
	"time"
)

// Background device work (finishing removals, making and reclaiming warm
// devices) costs the kernel tens of milliseconds a step, and a snapshot
// call that meets it waits for the pool and the dm locks behind it. The
// worker therefore starts each piece in a pause between calls: none in
// flight and none for quietFor. A removal waits at most maxDefer from
// when it was journaled, so a steady stream of calls never lets the
// backlog grow.
const (
	quietFor = 50 * time.Millisecond
	maxDefer = 2 * time.Second
)

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
