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
	if why := s.repairRefusal(st, fs); why != "" {
		refuse(fs, why)
		return
	}
	r := repairs{s: s, fs: fs}
	r.journal(ctx)
	r.devices(ctx)
	r.notReady(ctx)
	r.orphans(ctx)
	if opts.ReleaseForeign {
		r.foreign(ctx)
	}
	r.leakedIDs(ctx)
	r.missingDevices(ctx)
	r.base(ctx)
	if opts.RemoveGhosts {
		r.ghosts(ctx)
	}
}

// repairRefusal says why nothing may be repaired, or "": the pool may not
// be this database's, or it is unhealthy.
func (s *Snapshotter) repairRefusal(st *checkState, fs []Finding) string {
	if ok, why := s.poolIsOurs(st); !ok {
		return "not repaired: the pool may not be this database's: " + why
	}
	for _, f := range fs {
		if f.Kind == FindingPoolUnhealthy {
			return "not repaired: the pool is unhealthy; check its metadata with thin_check first"
		}
	}
	return ""
}

// repairs is one repair in progress over the findings fs.
type repairs struct {
	s  *Snapshotter
	fs []Finding
}

// of returns the findings of kind k.
func (r *repairs) of(k FindingKind) []*Finding {
	var out []*Finding
	for i := range r.fs {
		if r.fs[i].Kind == k {
			out = append(out, &r.fs[i])
		}
	}
	return out
}

// done records what was done about f, and whether it worked.
func done(f *Finding, action string, err error) {
	f.Action = action
	if err != nil {
		f.Error = err.Error()
		return
	}
	f.Repaired = true
}

// journal runs the startup recovery for the pending entries, which also
// aligns the database's transaction id. Its reactivation pass may fail on
// a ghost; the entries it left pending show.
func (r *repairs) journal(ctx context.Context) {
	pend, mismatch := r.of(FindingPendingJournal), r.of(FindingTxIDMismatch)
	if len(pend) == 0 && len(mismatch) == 0 {
		return
	}
	rerr := r.s.recover(ctx)
	left := map[uint64]bool{}
	_ = r.s.db.View(ctx, func(tx *storage.Tx) error {
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
	for _, f := range mismatch {
		done(f, "recorded the pool's transaction id after recovery", nil)
	}
}

// devices removes stale and wrong dm devices unless open, and activates a
// wrong one again with the right table.
func (r *repairs) devices(ctx context.Context) {
	for _, f := range append(r.of(FindingStaleDevice), r.of(FindingWrongDevice)...) {
		if !f.Repairable {
			continue
		}
		err := r.s.deactivateIdle(ctx, f.Device)
		action := "removed dm device " + f.Device
		if err == nil && f.Kind == FindingWrongDevice {
			err = r.s.activateRecord(ctx, f.Key)
			action += " and activated it again"
		}
		done(f, action, err)
	}
}

// notReady removes the records left creating or removing, with their
// devices.
func (r *repairs) notReady(ctx context.Context) {
	for _, f := range r.of(FindingNotReady) {
		done(f, fmt.Sprintf("removed record %q and thin device %d", f.Key, f.DeviceID), r.s.removeRecord(ctx, f.Key))
	}
}

// orphans records as foreign the pool's thin devices that nothing in the
// database explains: it cannot prove it made them, so they are kept, and
// only --release-foreign deletes them.
func (r *repairs) orphans(ctx context.Context) {
	for _, f := range r.of(FindingOrphan) {
		err := r.s.db.Update(ctx, func(tx *storage.Tx) error { return tx.MarkForeign(f.DeviceID) })
		done(f, fmt.Sprintf("recorded thin device %d as foreign: kept, never used (--release-foreign deletes it)", f.DeviceID), err)
	}
}

// foreign frees the foreign ids, deleting their devices like orphans when
// the pool still has them.
func (r *repairs) foreign(ctx context.Context) {
	for _, f := range r.of(FindingForeign) {
		if !f.inPool {
			err := r.s.db.Update(ctx, func(tx *storage.Tx) error {
				if err := tx.UnmarkForeign(f.DeviceID); err != nil {
					return err
				}
				return tx.ReleaseID(f.DeviceID)
			})
			done(f, fmt.Sprintf("released foreign id %d", f.DeviceID), err)
			continue
		}
		err := r.s.journaledDelete(ctx, func(tx *storage.Tx) (storage.Entry, error) {
			return storage.Entry{Op: storage.OpDelete, DeviceID: f.DeviceID}, tx.UnmarkForeign(f.DeviceID)
		})
		done(f, fmt.Sprintf("deleted foreign thin device %d from the pool and released its id", f.DeviceID), err)
	}
}

// leakedIDs releases allocated ids that nothing explains.
func (r *repairs) leakedIDs(ctx context.Context) {
	for _, f := range r.of(FindingLeakedID) {
		err := r.s.db.Update(ctx, func(tx *storage.Tx) error { return tx.ReleaseID(f.DeviceID) })
		done(f, fmt.Sprintf("released id %d", f.DeviceID), err)
	}
}

// missingDevices activates the missing devices of active snapshots and
// views.
func (r *repairs) missingDevices(ctx context.Context) {
	for _, f := range r.of(FindingMissingDevice) {
		done(f, "activated dm device "+f.Device, r.s.activateRecord(ctx, f.Key))
	}
}

// base makes a missing base device again.
func (r *repairs) base(ctx context.Context) {
	for _, f := range r.of(FindingBaseMissing) {
		err := r.s.db.Update(ctx, func(tx *storage.Tx) error {
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
			err = r.s.ensureBase(ctx)
		}
		done(f, "made a new base device", err)
	}
}

// ghosts removes the records of snapshots whose device is gone, leaves
// first: a parent goes once its ghost children went.
func (r *repairs) ghosts(ctx context.Context) {
	ghosts := r.of(FindingGhost)
	for progress := true; progress; {
		progress = false
		for _, f := range ghosts {
			if f.Repaired {
				continue
			}
			// Its device is gone: the removal only frees the id.
			err := r.s.removeRecord(ctx, f.Key)
			done(f, fmt.Sprintf("removed the record of %q (its device was gone)", f.Key), err)
			progress = progress || err == nil
		}
	}
}

// removeRecord removes the record of key and deletes its devices, as
// Remove does.
func (s *Snapshotter) removeRecord(ctx context.Context, key string) error {
	var dels []storage.Entry
	if err := s.db.Update(ctx, func(tx *storage.Tx) error {
		sn, err := tx.RemoveSnapshot(key)
		if err != nil {
			return err
		}
		dels, err = removalEntries(tx, sn)
		return err
	}); err != nil {
		return err
	}
	return s.finishDeletes(ctx, dels)
}

// journaledDelete journals the removal entry returns, in the same
// transaction as what entry changes, and finishes it.
func (s *Snapshotter) journaledDelete(ctx context.Context, entry func(tx *storage.Tx) (storage.Entry, error)) error {
	var e storage.Entry
	err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		if e, err = entry(tx); err != nil {
			return err
		}
		e.Seq, err = tx.AddJournal(e)
		return err
	})
	if err != nil {
		return err
	}
	return s.finishDelete(ctx, e)
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
	var (
		sn  storage.Snapshot
		dev uint32
	)
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if sn, err = readyIn(tx, key); err != nil {
			return err
		}
		dev, err = s.deviceOf(tx, sn)
		return err
	}); err != nil {
		return err
	}
	if sn.Kind == snapshots.KindCommitted {
		return nil
	}
	return s.pool.Activate(s.deviceName(dev), dev, dmsetup.BytesToSectors(sn.Size), sn.Kind == snapshots.KindView)
}
