package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolOwnership decides whether the pool known by names (poolNames), at
// transaction id poolTx, is the one the database manages. pi is the
// database's pool record (zero when it has none), dbTx its transaction id
// and pending the number of journal entries a crash may have left. The
// pool's transaction id must be the recorded one, or ahead of it by no more
// than the pending entries explain. New says the database has no pool yet
// and the pool was never used (transaction id 0): the daemon takes it as its
// own. Otherwise a non-empty mismatch says why the pool may not be the
// database's.
//
// The daemon at startup (checkOwnership) and Check's repair both decide with
// it, so they never disagree.
func poolOwnership(pi storage.PoolInfo, dbTx uint64, pending int, names []string, poolTx uint64) (isNew bool, mismatch string) {
	switch {
	case pi.Name == "" && poolTx != 0:
		return false, fmt.Sprintf("the database is new but the pool's transaction id is %d (the pool was used before, by another database or daemon)", poolTx)
	case pi.Name == "":
		return true, ""
	case !slices.Contains(names, pi.Name):
		return false, fmt.Sprintf("the database belongs to pool %s", pi.Name)
	case poolTx < dbTx || poolTx > dbTx+uint64(pending):
		return false, fmt.Sprintf("the pool's transaction id is %d but the database recorded %d with %d operations pending (a re-created pool, or someone else's)", poolTx, dbTx, pending)
	}
	return false, ""
}

// checkOwnership makes sure the pool is the one this database manages
// (poolOwnership), records a new pool, and adopts a mismatched one when
// allow_adopt is set.
func (s *Snapshotter) checkOwnership(ctx context.Context) error {
	name := s.pool.Name()
	st, err := s.pool.Status()
	if err != nil {
		return fmt.Errorf("status of pool %s: %w", name, err)
	}
	if st.Fail || st.Error {
		return fmt.Errorf("pool %s has failed (status Fail/Error): run thin_check on its metadata: %w", name, errdefs.ErrFailedPrecondition)
	}
	var (
		pi      storage.PoolInfo
		dbTx    uint64
		pending int
	)
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if pi, err = tx.PoolInfo(); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if dbTx, err = tx.TransactionID(); err != nil {
			return err
		}
		entries, err := tx.Journal()
		pending = len(entries)
		return err
	}); err != nil {
		return err
	}

	isNew, mismatch := poolOwnership(pi, dbTx, pending, poolNames(s.pool), st.TransactionID)
	if mismatch != "" && !s.cfg.AllowAdopt {
		return fmt.Errorf("pool %s: %s; refusing to use it (set allow_adopt = true under [pool] to take it over): %w", name, mismatch, errdefs.ErrFailedPrecondition)
	}
	if mismatch != "" {
		log.G(ctx).WithField("pool", name).Warnf("adopting pool: %s", mismatch)
	}
	if isNew || mismatch != "" {
		if pi.Name == "" {
			pi.Created = time.Now().UTC()
		}
		pi.Name = name
		if err := s.db.Update(ctx, func(tx *storage.Tx) error {
			if err := tx.SetPoolInfo(pi); err != nil {
				return err
			}
			return tx.SetTransactionID(st.TransactionID)
		}); err != nil {
			return err
		}
	}
	s.txid = st.TransactionID
	s.recordedPool = pi.Name
	return nil
}

// poolNames are the names a database may have recorded for pool: an LVM
// pool's dm name changes when LVM thin volumes come or go, and a database
// made with either one keeps it.
func poolNames(pool Pool) []string {
	if a, ok := pool.(interface{ Aliases() []string }); ok {
		return a.Aliases()
	}
	return []string{pool.Name()}
}

// recover finishes or rolls back every operation a crash interrupted, then
// activates the devices of active snapshots and views that are gone (after a
// reboot).
func (s *Snapshotter) recover(ctx context.Context) error {
	start := time.Now()
	defer func() { s.recovered(func(r *Recovery) { r.Duration = time.Since(start) }) }()
	var entries []storage.Entry
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		entries, err = tx.Journal()
		return err
	}); err != nil {
		return err
	}
	for _, e := range entries {
		l := log.G(ctx).WithField("op", e.Op.String()).WithField("id", e.DeviceID).WithField("key", e.Key)
		switch e.Op {
		case storage.OpCreateSnap, storage.OpCreateThin:
			// The caller never heard of success: undo it.
			if err := s.pool.Deactivate(ctx, s.deviceName(e.DeviceID)); err != nil {
				return err
			}
			s.poolMu.Lock()
			err := ignoreNoData(s.pool.DeleteThin(e.DeviceID))
			s.poolMu.Unlock()
			if err != nil {
				return err
			}
			if err := s.rollbackCreate(ctx, e, false); err != nil {
				return err
			}
			s.recovered(func(r *Recovery) { r.RolledBackCreates++ })
			l.Info("recovery: rolled back an interrupted create")
		case storage.OpCommitSnap:
			// The caller never heard of success: the active keeps its
			// device and the new one goes.
			if err := s.rollbackCommit(ctx, e, true); err != nil {
				return err
			}
			s.recovered(func(r *Recovery) { r.DroppedOperations++ })
			l.Info("recovery: rolled back an interrupted commit")
		case storage.OpDelete, storage.OpWarm:
			if e.Op == storage.OpWarm {
				// Left by a crash or a stop that could not delete it:
				// never handed out now, whatever becomes of it.
				if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
					if err := tx.FinishJournal(e.Seq); err != nil {
						return err
					}
					e = storage.Entry{Op: storage.OpDelete, DeviceID: e.DeviceID, OriginID: e.OriginID, Key: e.Key, Size: e.Size}
					e.Seq, err = tx.AddJournal(e)
					return err
				}); err != nil {
					return err
				}
			}
			if err := s.finishDelete(ctx, e); err != nil {
				if dmsetup.IsBusy(err) {
					s.recovered(func(r *Recovery) { r.DeferredRemovals++ })
					l.WithError(err).Warn("recovery: device still open, removal stays pending")
					continue
				}
				return err
			}
			s.recovered(func(r *Recovery) { r.FinishedRemovals++ })
			l.Info("recovery: finished an interrupted removal")
		default:
			// An interrupted commit left the snapshot active: its
			// caller saw a failure and may commit again.
			if err := s.db.Update(ctx, func(tx *storage.Tx) error { return tx.FinishJournal(e.Seq) }); err != nil {
				return err
			}
			s.recovered(func(r *Recovery) { r.DroppedOperations++ })
			l.Info("recovery: dropped an interrupted operation; the snapshot keeps its previous state")
		}
	}
	if err := s.db.Update(ctx, func(tx *storage.Tx) error { return tx.SetTransactionID(s.txid) }); err != nil {
		return err
	}

	var missing []storage.Snapshot
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		return tx.WalkSnapshots(func(snap storage.Snapshot) error {
			if snap.State == storage.StateReady && snap.Kind != snapshots.KindCommitted {
				missing = append(missing, snap)
			}
			return nil
		})
	}); err != nil {
		return err
	}
	for _, snap := range missing {
		name := s.deviceName(snap.DeviceID)
		if info, err := s.pool.Info(name); err == nil {
			// A crash between the suspend and the resume around a
			// snapshot of it (Commit) left it suspended.
			if info.Suspended {
				if err := s.pool.Resume(name); err != nil {
					return fmt.Errorf("resume %q: %w", snap.Key, err)
				}
				log.G(ctx).WithField("key", snap.Key).WithField("id", snap.DeviceID).Info("recovery: resumed a suspended device")
			}
			continue
		} else if !dmsetup.IsNotFound(err) {
			return err
		}
		if err := s.pool.Activate(name, snap.DeviceID, dmsetup.BytesToSectors(snap.Size), snap.Kind == snapshots.KindView); err != nil {
			return fmt.Errorf("reactivate %q: %w", snap.Key, err)
		}
		s.recovered(func(r *Recovery) { r.ReactivatedDevices++ })
		log.G(ctx).WithField("key", snap.Key).WithField("id", snap.DeviceID).Info("recovery: reactivated device")
	}
	return nil
}
