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
		if err := dropCreating(tx, e); err != nil {
			return err
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
