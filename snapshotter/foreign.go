package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"

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
	uerr := s.recordForeign(ctx, e)
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

// recordForeign records the id of entry e, an interrupted or refused
// create or commit, as foreign: the device there is kept and the id never
// used again. The record the create left creating goes and the entry is
// finished.
func (s *Snapshotter) recordForeign(ctx context.Context, e storage.Entry) error {
	return s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := dropCreating(tx, e); err != nil {
			return err
		}
		if err := tx.MarkForeign(e.DeviceID); err != nil {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
}

// scanIDs lists the thin ids in the pool and marks foreign every one the
// database does not hold, then records that the pool was scanned: from
// then on a device at an id the database hands out can only be its own,
// and recovery may delete it. A pending create or commit whose id the pool
// has is settled here: nothing says whether it or someone else made that
// device, so its id becomes foreign too. It runs at startup, before
// recovery and before any call, and in Check's repair.
func (s *Snapshotter) scanIDs(ctx context.Context) error {
	in, err := s.inspector()
	if err != nil {
		return err
	}
	s.poolMu.Lock()
	meta, err := in.ReserveMetadata()
	s.poolMu.Unlock()
	if err != nil {
		return err
	}
	ids, err := meta.ThinIDs(ctx)
	if err = errors.Join(err, meta.Release()); err != nil {
		return err
	}
	var marked []uint32
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		marked = nil // the transaction may run again
		held, pending, err := heldIDs(tx)
		if err != nil {
			return err
		}
		for _, id := range ids {
			if held[id] {
				continue
			}
			if e, ok := pending[id]; ok {
				if err := dropCreating(tx, e); err != nil {
					return err
				}
				if err := tx.FinishJournal(e.Seq); err != nil {
					return err
				}
			}
			if err := tx.MarkForeign(id); err != nil {
				return fmt.Errorf("thin id %d: %w", id, err)
			}
			marked = append(marked, id)
		}
		pi, err := tx.PoolInfo()
		if err != nil {
			return err
		}
		pi.IDsScanned = true
		return tx.SetPoolInfo(pi)
	})
	if err == nil {
		log.G(ctx).WithField("pool", s.pool.Name()).WithField("devices", len(ids)).WithField("foreign", marked).
			Info("listed the pool's thin ids: those the database cannot prove it made are foreign")
	}
	return err
}

// heldIDs returns the thin ids the database proves are its own devices
// (those of ready or removing records and the ids reserved for their
// commits, the base, warm devices and pending removals) and the pending
// creates and commits by id.
func heldIDs(tx *storage.Tx) (held map[uint32]bool, pending map[uint32]storage.Entry, err error) {
	held, pending = map[uint32]bool{}, map[uint32]storage.Entry{}
	pi, err := tx.PoolInfo()
	if err != nil {
		return nil, nil, err
	}
	held[pi.BaseDeviceID] = true
	if err := tx.WalkSnapshots(func(sn storage.Snapshot) error {
		if sn.State != storage.StateCreating {
			held[sn.DeviceID] = true
		}
		// A device there is from a commit a crash cut short.
		held[sn.CommitID] = true
		return nil
	}); err != nil {
		return nil, nil, err
	}
	warm, err := tx.WarmDevices()
	if err != nil {
		return nil, nil, err
	}
	for _, w := range warm {
		held[w.DeviceID] = true
	}
	entries, err := tx.Journal()
	if err != nil {
		return nil, nil, err
	}
	for _, e := range entries {
		if e.Op == storage.OpDelete {
			held[e.DeviceID] = true
		} else {
			pending[e.DeviceID] = e
		}
	}
	delete(held, 0)
	return held, pending, nil
}

// provenOurs says whether the device of a pending create or commit entry
// e, if the pool has one, is the daemon's own: the pool's ids were scanned
// before e's id was handed out, and the id is not foreign.
func provenOurs(tx *storage.Tx, e storage.Entry) (bool, error) {
	pi, err := tx.PoolInfo()
	if err != nil || !pi.IDsScanned {
		return false, err
	}
	foreign, err := tx.ForeignIDs()
	return !slices.Contains(foreign, e.DeviceID), err
}
