package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// repair acts on the findings in place, in the order the documentation
// gives; every step is journaled like a normal operation where it touches
// the pool.
func (s *Snapshotter) repair(ctx context.Context, st *checkState, fs []Finding, opts CheckOptions) {
	if ok, why := s.poolIsOurs(st); !ok {
		refuse(fs, "not repaired: the pool may not be this database's: "+why)
		return
	}
	for _, f := range fs {
		if f.Kind == FindingPoolUnhealthy {
			refuse(fs, "not repaired: the pool is unhealthy; check its metadata with thin_check first")
			return
		}
	}
	done := func(f *Finding, action string, err error) {
		f.Action = action
		if err != nil {
			f.Error = err.Error()
			return
		}
		f.Repaired = true
	}
	byKind := func(k FindingKind) []*Finding {
		var out []*Finding
		for i := range fs {
			if fs[i].Kind == k {
				out = append(out, &fs[i])
			}
		}
		return out
	}

	// The journal first, with the startup recovery itself. Its
	// reactivation pass may fail on a ghost; what it left pending shows.
	if pend := byKind(FindingPendingJournal); len(pend) > 0 || len(byKind(FindingTxIDMismatch)) > 0 {
		rerr := s.recover(ctx)
		left := map[uint64]bool{}
		_ = s.db.View(ctx, func(tx *storage.Tx) error {
			entries, err := tx.Journal()
			for _, e := range entries {
				left[e.Seq] = true
			}
			return err
		})
		for _, f := range pend {
			err := rerr
			if !left[f.seq] {
				err = nil
			} else if err == nil {
				err = errors.New("still pending (device open?)")
			}
			done(f, "ran recovery for the entry", err)
		}
		for _, f := range byKind(FindingTxIDMismatch) {
			done(f, "recorded the pool's transaction id after recovery", nil)
		}
	}

	for _, f := range append(byKind(FindingStaleDevice), byKind(FindingWrongDevice)...) {
		if !f.Repairable {
			continue
		}
		err := s.deactivateIdle(ctx, f.Device)
		action := "removed dm device " + f.Device
		if err == nil && f.Kind == FindingWrongDevice {
			err = s.activateRecord(ctx, f.Key)
			action += " and activated it again"
		}
		done(f, action, err)
	}

	for _, f := range byKind(FindingNotReady) {
		var e storage.Entry
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			sn, err := tx.RemoveSnapshot(f.Key)
			if err != nil {
				return err
			}
			e = storage.Entry{Op: storage.OpDelete, DeviceID: sn.DeviceID, Key: f.Key, Size: sn.Size}
			e.Seq, err = tx.AddJournal(e)
			return err
		})
		if err == nil {
			err = s.finishDelete(ctx, e)
		}
		done(f, fmt.Sprintf("removed record %q and thin device %d", f.Key, f.DeviceID), err)
	}

	for _, f := range byKind(FindingOrphan) {
		var e storage.Entry
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			// Reserved first so the allocator cannot hand it out while
			// the delete is in flight.
			if used, err := tx.IDInUse(f.DeviceID); err != nil {
				return err
			} else if !used {
				if err := tx.ReserveID(f.DeviceID); err != nil {
					return err
				}
			}
			e = storage.Entry{Op: storage.OpDelete, DeviceID: f.DeviceID}
			var err error
			e.Seq, err = tx.AddJournal(e)
			return err
		})
		if err == nil {
			err = s.finishDelete(ctx, e)
		}
		done(f, fmt.Sprintf("deleted thin device %d from the pool", f.DeviceID), err)
	}

	if opts.ReleaseForeign {
		for _, f := range byKind(FindingForeign) {
			var e storage.Entry
			err := s.db.Update(ctx, func(tx *storage.Tx) error {
				if err := tx.UnmarkForeign(f.DeviceID); err != nil {
					return err
				}
				if !f.inPool {
					return tx.ReleaseID(f.DeviceID)
				}
				// Deleted like an orphan; the id is freed with it.
				e = storage.Entry{Op: storage.OpDelete, DeviceID: f.DeviceID}
				var err error
				e.Seq, err = tx.AddJournal(e)
				return err
			})
			action := fmt.Sprintf("released foreign id %d", f.DeviceID)
			if err == nil && f.inPool {
				err = s.finishDelete(ctx, e)
				action = fmt.Sprintf("deleted foreign thin device %d from the pool and released its id", f.DeviceID)
			}
			done(f, action, err)
		}
	}

	for _, f := range byKind(FindingLeakedID) {
		err := s.db.Update(ctx, func(tx *storage.Tx) error { return tx.ReleaseID(f.DeviceID) })
		done(f, fmt.Sprintf("released id %d", f.DeviceID), err)
	}

	for _, f := range byKind(FindingMissingDevice) {
		done(f, "activated dm device "+f.Device, s.activateRecord(ctx, f.Key))
	}

	for _, f := range byKind(FindingBaseMissing) {
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			pi, err := tx.PoolInfo()
			if err != nil {
				return err
			}
			if err := tx.ReleaseID(pi.BaseDeviceID); err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			pi.BaseDeviceID = 0
			return tx.SetPoolInfo(pi)
		})
		if err == nil {
			err = s.ensureBase(ctx)
		}
		done(f, "made a new base device", err)
	}

	if opts.RemoveGhosts {
		ghosts := byKind(FindingGhost)
		// Leaves first: a parent goes once its ghost children went.
		for progress := true; progress; {
			progress = false
			for _, f := range ghosts {
				if f.Repaired {
					continue
				}
				err := s.db.Update(ctx, func(tx *storage.Tx) error {
					sn, err := tx.RemoveSnapshot(f.Key)
					if err != nil {
						return err
					}
					return tx.ReleaseID(sn.DeviceID)
				})
				done(f, fmt.Sprintf("removed the record of %q (its device was gone)", f.Key), err)
				progress = progress || err == nil
			}
		}
	}
}

// refuse marks every finding as left for a person.
func refuse(fs []Finding, why string) {
	for i := range fs {
		fs[i].Action = why
	}
}

// deactivateIdle removes dm device name unless it is open.
func (s *Snapshotter) deactivateIdle(ctx context.Context, name string) error {
	info, err := s.pool.Info(name)
	if err != nil {
		if dmsetup.IsNotFound(err) {
			return nil
		}
		return err
	}
	if info.OpenCount > 0 {
		return fmt.Errorf("dm device %s is open (mounted?): %w", name, errdefs.ErrFailedPrecondition)
	}
	return s.pool.Deactivate(ctx, name)
}

// activateRecord activates the device of the ready active snapshot or view
// key.
func (s *Snapshotter) activateRecord(ctx context.Context, key string) error {
	sn, err := s.ready(ctx, key)
	if err != nil {
		return err
	}
	if sn.Kind == snapshots.KindCommitted {
		return nil
	}
	return s.pool.Activate(s.deviceName(sn.DeviceID), sn.DeviceID, dmsetup.BytesToSectors(sn.Size), sn.Kind == snapshots.KindView)
}
