package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Commit turns active snapshot key into committed snapshot name. The
// committed snapshot gets a new device, a snapshot of the active's. The
// active's device holds exactly the committed content and is still
// active, so it becomes a warm device of name, for name's next child
// (warm.go).
//
// The new device's id was reserved in the active's record when the active
// was made (storage.Snapshot.CommitID), which is the commit's intent: a
// commit a crash cut short can only have made a device on that id, and
// the next start deletes it (sweepCommitIDs). So a Commit writes the
// database once, when it records the outcome.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if err := checkDefaultKey(name); err != nil {
		return err
	}
	return s.commit(ctx, name, key, opts...)
}

// commit is Commit for any key space (size classes call it too).
func (s *Snapshotter) commit(ctx context.Context, name, key string, opts ...snapshots.Opt) (err error) {
	defer s.bg.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()

	snap, usage, err := s.committable(ctx, key, name)
	if err != nil {
		return err
	}
	if err := s.poolFaultNow(); err != nil {
		return err
	}
	// The pool may fail while the call runs.
	defer func() { err = s.blameFault(err) }()
	if snap.CommitID == 0 {
		// Made before commit ids were reserved.
		if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
			snap.CommitID, err = reserveCommitID(tx, key)
			return err
		}); err != nil {
			return err
		}
	}
	if err := s.snapCommit(ctx, &snap); err != nil {
		return errors.Join(fmt.Errorf("commit %q: %w", key, err), s.dropCommitDevice(ctx, snap, err))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.CommitActive(key, name, snap.CommitID, usage, opts...); err != nil {
			return err
		}
		if err := tx.AddWarm(storage.Warm{DeviceID: snap.DeviceID, Parent: name, OriginID: snap.CommitID, Size: snap.Size}); err != nil {
			return err
		}
		var err error
		dels, err = dropWarm(tx, overBound)
		return err
	})
	if err != nil {
		// Still active in the records (a name taken meanwhile, say).
		return errors.Join(err, s.dropCommitDevice(ctx, snap, nil))
	}
	if len(dels) > 0 {
		s.kick()
	}
	return nil
}

// reserveCommitID reserves a new id for the commit of active snapshot key
// in tx (storage.Snapshot.CommitID).
func reserveCommitID(tx *storage.Tx, key string) (uint32, error) {
	id, err := tx.AllocateID()
	if err != nil {
		return 0, err
	}
	_, err = tx.SetCommitID(key, id)
	return id, err
}

// committable returns the record of active snapshot key and its usage, if
// it can be committed as name: containerd has unmounted it and name is
// free.
func (s *Snapshotter) committable(ctx context.Context, key, name string) (storage.Snapshot, snapshots.Usage, error) {
	var snap storage.Snapshot
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if snap, err = readyIn(tx, key); err != nil {
			return err
		}
		if _, err := tx.GetSnapshot(name); err == nil {
			return fmt.Errorf("snapshot %q: %w", name, errdefs.ErrAlreadyExists)
		} else if !errdefs.IsNotFound(err) {
			return err
		}
		return nil
	}); err != nil {
		return snap, snapshots.Usage{}, err
	}
	if snap.Kind != snapshots.KindActive {
		return snap, snapshots.Usage{}, fmt.Errorf("snapshot %q is %s, only active snapshots can be committed: %w", key, snap.Kind, errdefs.ErrFailedPrecondition)
	}
	dev := s.deviceName(snap.DeviceID)
	info, err := s.pool.Info(dev)
	if err != nil {
		return snap, snapshots.Usage{}, fmt.Errorf("device of %q: %w", key, err)
	}
	if info.OpenCount > 0 {
		return snap, snapshots.Usage{}, fmt.Errorf("device %s of %q is still open (mounted?): %w", dev, key, errdefs.ErrFailedPrecondition)
	}
	st, err := s.pool.ThinStatus(dev)
	if err != nil {
		return snap, snapshots.Usage{}, fmt.Errorf("usage of %q: %w", key, err)
	}
	return snap, ownUsage(st.MappedSectors, snap.Shared), nil
}

// snapCommit makes the committed snapshot's device: a snapshot of active
// snap's device on its CommitID. A device already there is someone else's
// (the start deletes what an interrupted commit left): the id becomes
// foreign and snap gets another one.
func (s *Snapshotter) snapCommit(ctx context.Context, snap *storage.Snapshot) error {
	for attempt := 1; ; attempt++ {
		s.poolMu.Lock()
		err := s.snapLocked(snap.CommitID, snap.DeviceID)
		s.poolMu.Unlock()
		if !dmsetup.IsExist(err) {
			return err
		}
		if attempt == maxIDTries {
			return errForeignIDs(err)
		}
		taken := snap.CommitID
		if uerr := s.db.Update(ctx, func(tx *storage.Tx) error {
			if _, err := tx.ClearCommitID(snap.Key); err != nil {
				return err
			}
			if err := tx.MarkForeign(taken); err != nil {
				return err
			}
			var err error
			snap.CommitID, err = reserveCommitID(tx, snap.Key)
			return err
		}); uerr != nil {
			return errors.Join(err, uerr)
		}
		log.G(ctx).WithError(err).WithField("key", snap.Key).
			Warnf("thin id %d is already in the pool and not ours: marked foreign (thin-snapshotter check lists it), trying the next id", taken)
	}
}

// dropCommitDevice deletes the device a failed commit of snap may have made
// on its CommitID, which stays reserved; not when the pool said the id is
// taken (err). When the pool refuses, the device goes to a journaled
// removal (the worker retries it) and snap gets another commit id.
func (s *Snapshotter) dropCommitDevice(ctx context.Context, snap storage.Snapshot, err error) error {
	if rerr := s.resumeSuspended(s.deviceName(snap.DeviceID)); rerr != nil {
		return rerr
	}
	if dmsetup.IsExist(err) || s.deleteThin(snap.CommitID) == nil {
		return nil
	}
	uerr := s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.ClearCommitID(snap.Key); err != nil {
			return err
		}
		e := storage.Entry{Op: storage.OpDelete, DeviceID: snap.CommitID, OriginID: snap.DeviceID, Key: snap.Key, Size: snap.Size}
		if _, err := tx.AddJournal(e); err != nil {
			return err
		}
		_, err := reserveCommitID(tx, snap.Key)
		return err
	})
	if uerr == nil {
		s.kick()
	}
	return uerr
}
