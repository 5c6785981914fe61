package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// How often the worker retries removals that could not finish.
const retryInterval = 10 * time.Second

// finishDelete deactivates and deletes the device of a journaled removal and
// frees its id.
func (s *Snapshotter) finishDelete(ctx context.Context, e storage.Entry) error {
	s.delMu.Lock()
	if s.deleting[e.Seq] {
		s.delMu.Unlock()
		return fmt.Errorf("removal of device %d already in progress: %w", e.DeviceID, errdefs.ErrUnavailable)
	}
	s.deleting[e.Seq] = true
	s.delMu.Unlock()
	defer func() {
		s.delMu.Lock()
		delete(s.deleting, e.Seq)
		s.delMu.Unlock()
	}()
	// Someone may have finished this entry since it was read; then its id
	// may already belong to a new snapshot and must not be deleted.
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		_, err := tx.GetJournal(e.Seq)
		return err
	}); err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return err
	}

	// A device whose blocks another device holds needs no discard: the
	// pool passes on only blocks no device maps any more.
	discard := s.cfg.discardOnDelete() && e.OriginID == 0
	if discard && s.discardActive(ctx, e) {
		discard = false
	}
	if err := s.timed(StepDeactivate, func() error { return s.pool.Deactivate(ctx, s.deviceName(e.DeviceID)) }); err != nil {
		return err
	}
	if discard {
		s.discardDevice(ctx, e)
	}
	if err := s.poolChange(nil, func() error {
		return s.timed(StepDelete, func() error { return ignoreNoData(s.pool.DeleteThin(e.DeviceID)) })
	}); err != nil {
		return err
	}
	return s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := tx.ReleaseID(e.DeviceID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
}

// discardActive discards the blocks of the device of a removal on its
// activation, when it is active, writable and closed: that saves the
// activation and removal discardDevice pays (~60 ms). It reports whether
// it did; if not, discardDevice does it after the deactivation.
func (s *Snapshotter) discardActive(ctx context.Context, e storage.Entry) bool {
	name := s.deviceName(e.DeviceID)
	info, err := s.pool.Info(name)
	if err != nil || info.OpenCount > 0 || info.ReadOnly || info.Suspended {
		return false
	}
	start := time.Now()
	// Opened exclusively: a mount since Info fails it (EBUSY).
	if err := s.pool.Discard(ctx, name); err != nil {
		return false
	}
	log.G(ctx).WithField("id", e.DeviceID).WithField("key", e.Key).WithField("duration", time.Since(start)).
		Debug("discarded the blocks of a removed snapshot on its activation")
	return true
}

// discardDevice discards the blocks of the thin device of a removal before
// it is deleted, on a writable activation of its own, so the pool passes
// them on to its storage (DiscardOnDelete). It is best effort: the device
// is deleted anyway, the space then stays with the pool's storage.
func (s *Snapshotter) discardDevice(ctx context.Context, e storage.Entry) {
	size := e.Size
	if size == 0 {
		// An orphan's size is not recorded; thin devices are sparse, so
		// discarding past a smaller one's end costs nothing.
		size = s.cfg.BaseSize
	}
	name := s.deviceName(e.DeviceID)
	start := time.Now()
	err := s.pool.Activate(name, e.DeviceID, dmsetup.BytesToSectors(size), false)
	if err == nil {
		err = s.pool.Discard(ctx, name)
		err = errors.Join(err, s.pool.Deactivate(ctx, name))
	}
	l := log.G(ctx).WithField("id", e.DeviceID).WithField("key", e.Key)
	if err != nil && !dmsetup.IsNotFound(err) {
		l.WithError(err).Warn("discarding the blocks of a removed snapshot; deleting it anyway")
		return
	}
	l.WithField("duration", time.Since(start)).Debug("discarded the blocks of a removed snapshot")
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

// Drain deletes the warm devices and finishes every pending removal now:
// the pool then holds only the snapshots' devices (an administrator's
// cleanup, and Close).
func (s *Snapshotter) Drain(ctx context.Context) error {
	err := s.reclaimWarm(ctx, func(storage.Entry, int) bool { return true })
	_, ferr := s.finishRemovals(ctx, false)
	return errors.Join(err, ferr)
}

// finishRemovals finishes the pending removals; paced, each waits for a
// pause between calls first (pace.go). It returns how many it found.
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
			s.calls.pause(ctx, e.Created.Add(maxDefer))
		}
		if err := s.finishDelete(ctx, e); err != nil && !errdefs.IsUnavailable(err) {
			errs = append(errs, fmt.Errorf("device %d of removed %q: %w", e.DeviceID, e.Key, err))
		}
	}
	return len(pending), errors.Join(errs...)
}

func (s *Snapshotter) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// worker finishes removals in the background: when kicked, and
// periodically for those that failed (a device still open); deletes warm
// devices that waited warmIdle for a child, and makes those asked for. It
// starts each in a pause between snapshot calls (pace.go).
func (s *Snapshotter) worker(ctx context.Context) {
	defer close(s.done)
	t := time.NewTicker(retryInterval)
	defer t.Stop()
	idle := time.NewTicker(warmIdle / 2)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		case <-t.C:
		case <-idle.C:
			s.calls.pause(ctx, time.Now().Add(maxDefer))
			cutoff := time.Now().Add(-warmIdle)
			if err := s.reclaimWarm(ctx, func(e storage.Entry, newer int) bool {
				return e.Created.Before(cutoff) || newer >= maxWarm
			}); err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("idle warm devices not deleted; will retry")
			}
			continue
		}
		if _, err := s.finishRemovals(ctx, true); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("pending removals not finished; will retry")
		}
		s.refillWarm(ctx)
	}
}
