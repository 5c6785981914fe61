package snapshotter

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// maxIDTries bounds how many ids one create tries when the pool already has
// them: a few foreign devices are skipped, a pool full of them is an error.
const maxIDTries = 16

// foreignID resolves a create step that failed because the pool already
// has thin id e.DeviceID (someone else's device): the id is recorded as
// foreign, never handed out again and never deleted by us, the record the
// create made is dropped and its journal entry finished. It reports whether
// it did; for any other failure it does nothing, and when recording fails
// the entry stays for the caller's usual rollback.
func (s *Snapshotter) foreignID(ctx context.Context, e storage.Entry, err error) bool {
	if err == nil || !dmsetup.IsExist(err) {
		return false
	}
	uerr := s.db.Update(ctx, func(tx *storage.Tx) error {
		if e.Key != "" {
			if snap, err := tx.GetSnapshot(e.Key); err == nil && snap.DeviceID == e.DeviceID && snap.State == storage.StateCreating {
				if _, err := tx.RemoveSnapshot(e.Key); err != nil {
					return err
				}
			} else if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
		}
		if err := tx.MarkForeign(e.DeviceID); err != nil {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
	l := log.G(ctx).WithField("id", e.DeviceID).WithField("key", e.Key).WithField("op", e.Op.String())
	if uerr != nil {
		l.WithError(uerr).Error("recording a foreign thin id")
		return false
	}
	l.WithError(err).Warnf("thin id %d is already in the pool and not ours: marked foreign (thin-snapshotter check lists it), trying the next id", e.DeviceID)
	return true
}

// errForeignIDs is the error of a create that found maxIDTries ids in a row
// taken.
func errForeignIDs(err error) error {
	return fmt.Errorf("%d thin ids in a row are already in the pool, held by devices that are not ours (see thin-snapshotter check): %w: %w",
		maxIDTries, err, errdefs.ErrFailedPrecondition)
}

// snapStep is one journaled create_snap onto a new thin id: journal picks
// the id and returns the entry to journal in tx, then the pool snapshots
// entry.OriginID into entry.DeviceID (a poolChange). While the pool already
// has the id picked, it is recorded as foreign and the step is tried again.
// The journal's error comes back as journalErr, the pool's as err.
func (s *Snapshotter) snapStep(ctx context.Context, journal func(tx *storage.Tx) (storage.Entry, error)) (entry storage.Entry, journalErr, err error) {
	for attempt := 1; ; attempt++ {
		err = s.poolChange(func() error {
			journalErr = s.db.Update(ctx, func(tx *storage.Tx) (err error) {
				if entry, err = journal(tx); err != nil {
					return err
				}
				entry.Seq, err = tx.AddJournal(entry)
				return err
			})
			return journalErr
		}, func() error {
			return s.snapLocked(entry.DeviceID, entry.OriginID)
		})
		if journalErr != nil {
			return entry, journalErr, nil
		}
		// The new id may be a device the pool already has: skipped.
		if !s.foreignID(ctx, entry, err) {
			return entry, nil, err
		}
		if attempt == maxIDTries {
			return entry, errForeignIDs(err), nil
		}
	}
}
