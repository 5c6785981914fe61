package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// How a journaled pool step is made and undone. The pool's own metadata
// commit makes each message durable, and recovery settles an interrupted
// step from its journal entry alone (it deletes an unfinished create's id,
// which the pool answers with ENODATA when it never made it, and finishes
// a removal). So a step does not move the pool's transaction id: a
// set_transaction_id after every message would be a second metadata commit
// (5-7 ms in the VM bench on a file-backed pool) and prove nothing. Only
// setting the pool up moves it (base.go).

// snapStep is one journaled create_snap onto a new thin id. journal picks
// the id and returns the entry to record in tx; the entry is written before
// poolMu is taken (see Concurrency), then the pool snapshots
// entry.OriginID into entry.DeviceID. While the pool already has the id
// picked, it is recorded as foreign and the step is tried again with a new
// one (foreign.go). On an error, entry.Seq is 0 when nothing was
// journaled; otherwise the caller undoes the entry.
func (s *Snapshotter) snapStep(ctx context.Context, journal func(tx *storage.Tx) (storage.Entry, error)) (storage.Entry, error) {
	for attempt := 1; ; attempt++ {
		var entry storage.Entry
		if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
			if entry, err = journal(tx); err != nil {
				return err
			}
			entry.Seq, err = tx.AddJournal(entry)
			return err
		}); err != nil {
			return storage.Entry{}, err
		}
		s.poolMu.Lock()
		err := s.snapLocked(entry.DeviceID, entry.OriginID)
		s.poolMu.Unlock()
		if !s.foreignID(ctx, entry, err) {
			return entry, err
		}
		if attempt == maxIDTries {
			return storage.Entry{}, errForeignIDs(err)
		}
	}
}

// snapLocked snapshots origin into id. An origin that may have writes in
// flight is suspended around it, so they land in the snapshot: one that is
// active, writable and open. A read-only one (a layer's device its views
// share) has none, and neither has one nobody holds open: the kernel
// finished its writes at its last close (a Commit's active device, which
// containerd has unmounted). Called with poolMu held.
func (s *Snapshotter) snapLocked(id, origin uint32) error {
	name := s.deviceName(origin)
	info, err := s.pool.Info(name)
	active := err == nil && info.LiveTable && !info.Suspended && !info.ReadOnly && info.OpenCount > 0
	if active {
		if err := s.pool.Suspend(name); err != nil {
			return err
		}
	}
	err = s.timed(StepCreateSnap, func() error { return s.pool.CreateSnap(id, origin) })
	if active {
		err = errors.Join(err, s.pool.Resume(name))
	}
	return err
}

// undo rolls back a journaled create or commit its caller never heard
// succeed: the origin of a commit is resumed if a failure left it
// suspended, the new device is deleted when made says the pool may have
// it (not when the pool said the id exists: then it is someone else's),
// the record left creating goes, the id is released and the entry
// finished. When the pool refuses, the entry stays for recovery.
func (s *Snapshotter) undo(ctx context.Context, e storage.Entry, made bool) error {
	var err error
	if e.Op == storage.OpCommitSnap {
		err = s.resumeSuspended(s.deviceName(e.OriginID))
	}
	if made {
		err = errors.Join(err, s.deleteDevice(ctx, e.DeviceID))
	}
	if err != nil {
		return fmt.Errorf("undoing %s of thin device %d (recovery finishes it): %w", e.Op, e.DeviceID, err)
	}
	return s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := dropCreating(tx, e); err != nil {
			return err
		}
		if err := tx.ReleaseID(e.DeviceID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
}

// dropCreating removes the record a create entry left creating, if it is
// still there on the entry's device.
func dropCreating(tx *storage.Tx, e storage.Entry) error {
	if e.Key == "" || e.Op == storage.OpCommitSnap {
		return nil // the base, a warm device, and commits have no new record
	}
	snap, err := tx.GetSnapshot(e.Key)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if snap.DeviceID != e.DeviceID || snap.State != storage.StateCreating {
		return nil
	}
	_, err = tx.RemoveSnapshot(e.Key)
	return err
}

// resumeSuspended resumes dm device name if it is suspended: a failed
// resume (or a crash) after a snapshot of it left it so, which would hang
// its users.
func (s *Snapshotter) resumeSuspended(name string) error {
	info, err := s.pool.Info(name)
	if err != nil || !info.Suspended {
		return nil
	}
	return s.pool.Resume(name)
}

// activate creates the dm device name of thin id, size bytes long.
func (s *Snapshotter) activate(name string, id uint32, size uint64, readOnly bool) error {
	return s.timed(StepActivate, func() error {
		return s.pool.Activate(name, id, dmsetup.BytesToSectors(size), readOnly)
	})
}

// deleteDevice removes the dm device of thin id, if any, then deletes the
// thin device from the pool.
func (s *Snapshotter) deleteDevice(ctx context.Context, id uint32) error {
	if err := s.deactivate(ctx, id); err != nil {
		return err
	}
	return s.deleteThin(id)
}

// deactivate removes the dm device of thin id; a missing one is fine.
func (s *Snapshotter) deactivate(ctx context.Context, id uint32) error {
	return s.timed(StepDeactivate, func() error { return s.pool.Deactivate(ctx, s.deviceName(id)) })
}

// deleteThin deletes thin id from the pool, under poolMu. An id the pool
// does not have (ENODATA) counts as deleted.
func (s *Snapshotter) deleteThin(id uint32) error {
	s.poolMu.Lock()
	defer s.poolMu.Unlock()
	return s.timed(StepDelete, func() error {
		err := s.pool.DeleteThin(id)
		if err != nil && dmsetup.IsNotFound(err) {
			return nil
		}
		return err
	})
}

// finishDeletes finishes the removals dels, reporting each failure but
// one another call has in hand (Unavailable).
func (s *Snapshotter) finishDeletes(ctx context.Context, dels []storage.Entry) error {
	var errs []error
	for _, e := range dels {
		if err := s.finishDelete(ctx, e); err != nil && !errdefs.IsUnavailable(err) {
			errs = append(errs, fmt.Errorf("device %d (%s of %q): %w", e.DeviceID, e.Op, e.Key, err))
		}
	}
	return errors.Join(errs...)
}

// logUndo logs a failed undo: the entry stays journaled and recovery
// finishes it.
func logUndo(ctx context.Context, err error, key string) {
	if err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Error("rolling back a failed step; recovery finishes it")
	}
}
