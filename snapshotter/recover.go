package snapshotter

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// recover finishes or rolls back every operation a crash interrupted,
// deletes the warm devices left behind, records the pool's transaction id,
// then activates the devices of active snapshots and views that are gone
// (after a reboot).
func (s *Snapshotter) recover(ctx context.Context) error {
	start := time.Now()
	defer func() { s.recovered(func(r *Recovery) { r.Duration = time.Since(start) }) }()
	if err := s.scanOnce(ctx); err != nil {
		// Then no interrupted create's device is proven ours: each is
		// kept, its id foreign.
		log.G(ctx).WithError(err).Warn("cannot list the pool's thin ids (is thin-provisioning-tools installed?): " +
			"devices of interrupted creates are kept and their ids recorded foreign")
	}
	if err := s.finishCommits(ctx); err != nil {
		return err
	}
	// Warm devices left by a crash, or by a stop that could not delete
	// them, are never handed out: they become removals like any other.
	var (
		entries []storage.Entry
		clean   bool
	)
	if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		// Until Close says otherwise, this process may crash.
		clean = tx.CleanStop()
		if err := tx.SetCleanStop(false); err != nil {
			return err
		}
		if _, err = dropWarm(tx, func(storage.Warm, int) bool { return true }); err != nil {
			return err
		}
		entries, err = tx.Journal()
		return err
	}); err != nil {
		return err
	}
	for _, e := range entries {
		if err := s.settle(ctx, e); err != nil {
			return err
		}
	}
	if err := s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := tx.SetTransactionID(s.txid); err != nil {
			return err
		}
		return reserveCommitIDs(tx)
	}); err != nil {
		return err
	}
	if !clean {
		if err := s.sweepCommitIDs(ctx); err != nil {
			return err
		}
	}
	return s.reactivate(ctx)
}

// finishCommits makes the devices of the commits a crash cut short after
// their record (commitAtOnce). Such a committed snapshot's device is made
// from its warm device, which holds the committed content and was never
// handed out: the snapshot's children waited for the commit. The pool
// answers EEXIST for the commits that finished, the usual case, and for
// warm devices made later from a layer's device.
func (s *Snapshotter) finishCommits(ctx context.Context) error {
	var ws []storage.Warm
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		if tx.CleanStop() {
			return nil
		}
		all, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		for _, w := range all {
			p, err := tx.GetSnapshot(w.Parent)
			if errdefs.IsNotFound(err) {
				continue
			}
			if err != nil {
				return err
			}
			if p.Kind == snapshots.KindCommitted && p.DeviceID == w.OriginID {
				ws = append(ws, w)
			}
		}
		return nil
	}); err != nil {
		return err
	}
	for _, w := range ws {
		s.poolMu.Lock()
		err := s.snapLocked(w.OriginID, w.DeviceID)
		s.poolMu.Unlock()
		if dmsetup.IsExist(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("finish the commit of %q from thin device %d: %w", w.Parent, w.DeviceID, err)
		}
		s.recovered(func(r *Recovery) { r.FinishedCommits++ })
		log.G(ctx).WithField("key", w.Parent).WithField("id", w.OriginID).Info("recovery: finished an interrupted commit")
	}
	return nil
}

// settle finishes or rolls back the interrupted operation e.
func (s *Snapshotter) settle(ctx context.Context, e storage.Entry) error {
	l := log.G(ctx).WithField("op", e.Op.String()).WithField("id", e.DeviceID).WithField("key", e.Key)
	switch e.Op {
	case storage.OpCreateSnap, storage.OpCreateThin, storage.OpCommitSnap:
		// The caller never heard of success: undo it. A commit's
		// active snapshot keeps its device. The new device is deleted
		// only when the database proves it is ours.
		if err := s.undoInterrupted(ctx, e); err != nil {
			return err
		}
		if e.Op == storage.OpCommitSnap {
			s.recovered(func(r *Recovery) { r.DroppedOperations++ })
			l.Info("recovery: rolled back an interrupted commit")
			return nil
		}
		s.recovered(func(r *Recovery) { r.RolledBackCreates++ })
		l.Info("recovery: rolled back an interrupted create")
	case storage.OpDelete:
		if err := s.finishDelete(ctx, e); err != nil {
			if dmsetup.IsBusy(err) {
				s.recovered(func(r *Recovery) { r.DeferredRemovals++ })
				l.WithError(err).Warn("recovery: device still open, removal stays pending")
				return nil
			}
			return err
		}
		s.recovered(func(r *Recovery) { r.FinishedRemovals++ })
		l.Info("recovery: finished an interrupted removal")
	default:
		// An interrupted commit of an older version left the snapshot
		// active: its caller saw a failure and may commit again.
		if err := s.db.Update(ctx, func(tx *storage.Tx) error { return tx.FinishJournal(e.Seq) }); err != nil {
			return err
		}
		s.recovered(func(r *Recovery) { r.DroppedOperations++ })
		l.Info("recovery: dropped an interrupted operation; the snapshot keeps its previous state")
	}
	return nil
}

// reserveCommitIDs reserves a commit id for every ready active snapshot
// that has none (made by an older version).
func reserveCommitIDs(tx *storage.Tx) error {
	var keys []string
	if err := tx.WalkSnapshots(func(snap storage.Snapshot) error {
		if snap.State == storage.StateReady && snap.Kind == snapshots.KindActive && snap.CommitID == 0 {
			keys = append(keys, snap.Key)
		}
		return nil
	}); err != nil {
		return err
	}
	for _, k := range keys {
		if _, err := reserveCommitID(tx, k); err != nil {
			return err
		}
	}
	return nil
}

// sweepCommitIDs deletes, after a crash, the devices that commits it cut
// short made on the ids reserved for them (storage.Snapshot.CommitID),
// when the database proves those ids were free when reserved
// (provenOurs); the pool answers ENODATA for the others, which is the
// usual case. Without that proof a device there stays, and the next commit
// records it foreign. After a clean stop no commit was cut short, and a
// device on a reserved id is someone else's: the commit finds it.
func (s *Snapshotter) sweepCommitIDs(ctx context.Context) error {
	var ids []uint32
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		return tx.WalkSnapshots(func(snap storage.Snapshot) error {
			if snap.CommitID == 0 {
				return nil
			}
			ok, err := provenOurs(tx, storage.Entry{DeviceID: snap.CommitID})
			if ok {
				ids = append(ids, snap.CommitID)
			}
			return err
		})
	}); err != nil {
		return err
	}
	for _, id := range ids {
		if err := s.deleteThin(id); err != nil {
			return fmt.Errorf("thin device %d of an interrupted commit: %w", id, err)
		}
	}
	return nil
}

// scanOnce lists the pool's thin ids (scanIDs) unless the database did
// before.
func (s *Snapshotter) scanOnce(ctx context.Context) error {
	var pi storage.PoolInfo
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		pi, err = tx.PoolInfo()
		return err
	}); err != nil || pi.IDsScanned {
		return err
	}
	return s.scanIDs(ctx)
}

// undoInterrupted undoes create or commit e, which a crash interrupted.
// Whether the pool made its device is unknown; it is deleted when the
// database proves the id was free when handed out (provenOurs), and kept
// with its id recorded foreign otherwise.
func (s *Snapshotter) undoInterrupted(ctx context.Context, e storage.Entry) error {
	var proven bool
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		proven, err = provenOurs(tx, e)
		return err
	}); err != nil {
		return err
	}
	if proven {
		return s.undo(ctx, e, true)
	}
	if e.Op == storage.OpCommitSnap {
		if err := s.resumeSuspended(s.deviceName(e.OriginID)); err != nil {
			return err
		}
	}
	log.G(ctx).WithField("id", e.DeviceID).WithField("key", e.Key).
		Warn("recovery: an interrupted create's thin id is not proven free: any device there is kept and the id recorded foreign (thin-snapshotter check lists it)")
	return s.recordForeign(ctx, e)
}

// reactivate activates the missing devices of active snapshots and views
// (a reboot takes them all), resumes those a crash left suspended, and
// removes the read-only device of a layer that no view shares any more (a
// crash between a layer's last view's removal and the deactivation).
func (s *Snapshotter) reactivate(ctx context.Context) error {
	need, idle, err := s.devicesNeeded(ctx)
	if err != nil {
		return err
	}
	for _, snap := range need {
		if err := s.ensureActive(ctx, snap); err != nil {
			return err
		}
	}
	for _, id := range idle {
		if info, err := s.pool.Info(s.deviceName(id)); err != nil || !info.ReadOnly || info.OpenCount > 0 {
			continue
		}
		if err := s.deactivate(ctx, id); err != nil {
			return err
		}
		log.G(ctx).WithField("id", id).Info("recovery: removed the device of a layer no view shares")
	}
	return nil
}

// devicesNeeded lists what must be active: active snapshots and views on
// their own devices, and each layer whose device views share, as a view of
// it (read-only); and the layers whose device nothing needs active.
func (s *Snapshotter) devicesNeeded(ctx context.Context) (need []storage.Snapshot, idle []uint32, err error) {
	err = s.db.View(ctx, func(tx *storage.Tx) error {
		shared := map[string]bool{}
		var layers []storage.Snapshot
		if err := tx.WalkSnapshots(func(snap storage.Snapshot) error {
			switch {
			case snap.State != storage.StateReady:
			case sharesDevice(snap):
				shared[snap.Parent] = true
			case snap.Kind == snapshots.KindCommitted:
				layers = append(layers, snap)
			default:
				need = append(need, snap)
			}
			return nil
		}); err != nil {
			return err
		}
		for _, l := range layers {
			if !shared[l.Key] {
				idle = append(idle, l.DeviceID)
				continue
			}
			need = append(need, storage.Snapshot{Key: l.Key, Kind: snapshots.KindView, DeviceID: l.DeviceID, Size: l.Size})
		}
		return nil
	})
	return need, idle, err
}

// ensureActive activates the device of snap if it is missing, and resumes
// it if a crash between the suspend and the resume around a snapshot of it
// (Commit) left it suspended.
func (s *Snapshotter) ensureActive(ctx context.Context, snap storage.Snapshot) error {
	name := s.deviceName(snap.DeviceID)
	if info, err := s.pool.Info(name); err == nil {
		if info.Suspended {
			if err := s.pool.Resume(name); err != nil {
				return fmt.Errorf("resume %q: %w", snap.Key, err)
			}
			log.G(ctx).WithField("key", snap.Key).WithField("id", snap.DeviceID).Info("recovery: resumed a suspended device")
		}
		return nil
	} else if !dmsetup.IsNotFound(err) {
		return err
	}
	if err := s.activate(name, snap.DeviceID, snap.Size, snap.Kind == snapshots.KindView); err != nil {
		return fmt.Errorf("reactivate %q: %w", snap.Key, err)
	}
	s.recovered(func(r *Recovery) { r.ReactivatedDevices++ })
	log.G(ctx).WithField("key", snap.Key).WithField("id", snap.DeviceID).Info("recovery: reactivated device")
	return nil
}
