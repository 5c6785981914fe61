package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Remove deletes a snapshot. The record goes at once; the device is deleted
// now, or by the worker when async_remove is set or the device is briefly
// busy.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	defer s.bg.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()
	// A Commit may be making key's device (commitAtOnce).
	if err := s.bg.committing.wait(ctx, key); err != nil {
		return err
	}

	snap, err := s.ready(ctx, key)
	if err != nil {
		return err
	}
	if sharesDevice(snap) {
		return s.removeView(ctx, snap) // no change to the pool
	}
	// Nothing is journaled for a pool that deletes nothing: the record
	// stays, and containerd's garbage collection tries again later.
	if err := s.poolFaultNow(); err != nil {
		return err
	}
	if snap.Kind != snapshots.KindCommitted {
		// A mounted snapshot is containerd's to unmount first; refusing
		// now keeps the record instead of leaving a busy device behind.
		if info, err := s.pool.Info(s.deviceName(snap.DeviceID)); err == nil && info.OpenCount > 0 {
			return fmt.Errorf("snapshot %q: device %s is open (mounted?): %w", key, s.deviceName(snap.DeviceID), errdefs.ErrFailedPrecondition)
		}
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		removed, err := tx.RemoveSnapshot(key)
		if err != nil {
			return err
		}
		// Its warm devices hold its content, so they go with it, and
		// first: then the layer's own discard finds its blocks no longer
		// shared and passes them on to the pool's storage.
		if dels, err = dropWarm(tx, func(w storage.Warm, _ int) bool { return w.Parent == key }); err != nil {
			return err
		}
		more, err := removalEntries(tx, removed)
		dels = append(dels, more...)
		return err
	})
	if err != nil {
		return err
	}
	if s.cfg.AsyncRemove {
		s.kick()
		return nil
	}
	if err := s.finishDeletes(ctx, dels); err != nil {
		// The removal is journaled: the worker retries it.
		log.G(ctx).WithError(err).WithField("key", key).Warn("device deletion deferred")
		s.kick()
	}
	return nil
}

// removeView removes view snap, which shares its layer's device: only its
// record goes (releaseLayer). Whether
// the view is mounted cannot be told from the shared device's open count;
// containerd unmounts a view before it removes it.
func (s *Snapshotter) removeView(ctx context.Context, snap storage.Snapshot) error {
	if err := s.db.Update(ctx, func(tx *storage.Tx) error {
		_, err := tx.RemoveSnapshot(snap.Key)
		return err
	}); err != nil {
		return err
	}
	s.releaseLayer(snap.Parent)
	return nil
}

// removalEntries journals in tx the deletion of the device of removed, a
// record just removed, and releases the id reserved for its commit: no
// device is ever left on it while the daemon serves (the start deletes
// what a crash left, and a failed commit hands its device to a removal).
func removalEntries(tx *storage.Tx, removed storage.Snapshot) ([]storage.Entry, error) {
	var out []storage.Entry
	add := func(e storage.Entry) error {
		var err error
		if e.Seq, err = tx.AddJournal(e); err == nil {
			out = append(out, e)
		}
		return err
	}
	if removed.DeviceID != 0 {
		e := storage.Entry{Op: storage.OpDelete, DeviceID: removed.DeviceID, Key: removed.Key, Size: removed.Size}
		if removed.Kind == snapshots.KindView && removed.Parent != "" {
			// A view is read-only, so its parent's device holds every
			// block it maps, unless its filesystem was grown to a
			// larger size (which wrote blocks of its own).
			p, err := tx.GetSnapshot(removed.Parent)
			if err != nil && !errdefs.IsNotFound(err) {
				return nil, err
			}
			if err == nil && p.Size == removed.Size {
				e.OriginID = p.DeviceID
			}
		}
		if err := add(e); err != nil {
			return nil, err
		}
	}
	if removed.CommitID != 0 {
		if err := tx.ReleaseID(removed.CommitID); err != nil && !errdefs.IsNotFound(err) {
			return nil, err
		}
	}
	return out, nil
}

// finishDelete deactivates and deletes the device of a journaled removal and
// frees its id.
func (s *Snapshotter) finishDelete(ctx context.Context, e storage.Entry) error {
	if !s.bg.removing.add(e.Seq) {
		return fmt.Errorf("removal of device %d already in progress: %w", e.DeviceID, errdefs.ErrUnavailable)
	}
	defer s.bg.removing.remove(e.Seq)
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
	if err := s.deactivate(ctx, e.DeviceID); err != nil {
		return err
	}
	if discard {
		s.discardDevice(ctx, e)
	}
	if err := s.deleteThin(e.DeviceID); err != nil {
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
