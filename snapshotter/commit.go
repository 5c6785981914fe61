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

// Commit turns active snapshot key into committed snapshot name. The
// committed snapshot gets a new device, a snapshot of the active's. The
// active's device holds exactly the committed content and is still
// active, so it becomes a warm device of name, for name's next child
// (warm.go).
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

	snap, usage, err := s.committable(ctx, key)
	if err != nil {
		return err
	}
	if err := s.poolFaultNow(); err != nil {
		return err
	}
	// The pool may fail while the call runs.
	defer func() { err = s.blameFault(err) }()
	entry, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		return commitEntry(tx, snap, name)
	})
	if err != nil {
		if entry.Seq == 0 {
			return err // nothing journaled
		}
		return errors.Join(fmt.Errorf("commit %q: %w", key, err), s.undo(ctx, entry, !dmsetup.IsExist(err)))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.CommitActive(key, name, entry.DeviceID, usage, opts...); err != nil {
			return err
		}
		if err := tx.FinishJournal(entry.Seq); err != nil {
			return err
		}
		if err := tx.AddWarm(storage.Warm{DeviceID: snap.DeviceID, Parent: name, OriginID: entry.DeviceID, Size: snap.Size}); err != nil {
			return err
		}
		var err error
		dels, err = dropWarm(tx, overBound)
		return err
	})
	if err != nil {
		// Still active in the records (a name taken meanwhile, say).
		return errors.Join(err, s.undo(ctx, entry, true))
	}
	if len(dels) > 0 {
		s.kick()
	}
	return nil
}

// committable returns the record of active snapshot key and its usage, if
// it can be committed: containerd has unmounted it.
func (s *Snapshotter) committable(ctx context.Context, key string) (storage.Snapshot, snapshots.Usage, error) {
	snap, err := s.ready(ctx, key)
	if err != nil {
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

// commitEntry checks in tx that active snap is unchanged and name is free,
// and returns the journal entry of its commit onto a new id.
func commitEntry(tx *storage.Tx, snap storage.Snapshot, name string) (storage.Entry, error) {
	cur, err := tx.GetSnapshot(snap.Key)
	if err != nil {
		return storage.Entry{}, err
	}
	if cur.DeviceID != snap.DeviceID || cur.State != storage.StateReady || cur.Kind != snapshots.KindActive {
		return storage.Entry{}, fmt.Errorf("snapshot %q changed during commit: %w", snap.Key, errdefs.ErrAborted)
	}
	if _, err := tx.GetSnapshot(name); err == nil {
		return storage.Entry{}, fmt.Errorf("snapshot %q: %w", name, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return storage.Entry{}, err
	}
	id, err := tx.AllocateID()
	return storage.Entry{Op: storage.OpCommitSnap, DeviceID: id, OriginID: snap.DeviceID, Key: snap.Key, Name: name, Size: snap.Size}, err
}
