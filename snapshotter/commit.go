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
// commit a crash cut short before its record can only have made a device
// on that id, and the next start deletes it (sweepCommitIDs). The record
// is written while the pool makes the device (commitAtOnce); one cut short
// after its record is finished by the next start (finishCommits).
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
	if err := s.commitAtOnce(ctx, name, snap, usage, opts); !errors.Is(err, errCommitIDTaken) {
		return err
	}
	// Someone else's device is on the reserved id: snapCommit records it
	// foreign and tries the next, then the record follows.
	if err := s.snapCommit(ctx, &snap); err != nil {
		return errors.Join(fmt.Errorf("commit %q: %w", key, err), s.dropCommitDevice(ctx, snap, err))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		dels, err = recordCommit(tx, name, snap, usage, opts)
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

// errCommitIDTaken: the pool has a device on the id reserved for a commit,
// which is not ours (the commit made none yet). The record was undone.
var errCommitIDTaken = errors.New("the reserved commit id is taken")

// commitAtOnce commits active snap as name: it makes the committed
// snapshot's device while it writes the record. Each waits tens of
// milliseconds (the pool's metadata commit, an fsync) and the call waits
// for the longer. poolMu is held from before the record's transaction
// until the device exists, so no pool message and no check sees the record
// without its device; the calls that use name as a parent, and Remove of
// name, wait for the commit (background.committing). Should the pool
// refuse, the record is undone.
func (s *Snapshotter) commitAtOnce(ctx context.Context, name string, snap storage.Snapshot, usage snapshots.Usage, opts []snapshots.Opt) error {
	done, err := s.bg.committing.acquire(ctx, name)
	if err != nil {
		return err
	}
	defer done()
	type result struct {
		dels []storage.Entry
		err  error
	}
	rec := make(chan result, 1)
	s.poolMu.Lock()
	go func() {
		var r result
		r.err = s.db.Update(ctx, func(tx *storage.Tx) (err error) {
			r.dels, err = recordCommit(tx, name, snap, usage, opts)
			return err
		})
		rec <- r
	}()
	kerr := s.snapLocked(snap.CommitID, snap.DeviceID)
	s.poolMu.Unlock()
	r := <-rec
	if len(r.dels) > 0 {
		s.kick()
	}
	switch {
	case r.err != nil:
		// Still active in the records (a name taken meanwhile, say).
		if kerr != nil {
			r.err = errors.Join(r.err, fmt.Errorf("commit %q: %w", snap.Key, kerr))
		}
		return errors.Join(r.err, s.dropCommitDevice(ctx, snap, kerr))
	case kerr != nil:
		if err := s.uncommit(ctx, name, snap, kerr); err != nil {
			return errors.Join(fmt.Errorf("commit %q: %w", snap.Key, kerr), err)
		}
		if dmsetup.IsExist(kerr) {
			return errCommitIDTaken
		}
		return fmt.Errorf("commit %q: %w", snap.Key, kerr)
	}
	return nil
}

// recordCommit records in tx that active snap is committed as name on its
// CommitID, and that its device is a warm device of name. It returns the
// removals of the warm devices this puts over the bound.
func recordCommit(tx *storage.Tx, name string, snap storage.Snapshot, usage snapshots.Usage, opts []snapshots.Opt) ([]storage.Entry, error) {
	if _, err := tx.CommitActive(snap.Key, name, snap.CommitID, usage, opts...); err != nil {
		return nil, err
	}
	if err := tx.AddWarm(storage.Warm{DeviceID: snap.DeviceID, Parent: name, OriginID: snap.CommitID, Size: snap.Size}); err != nil {
		return nil, err
	}
	return dropWarm(tx, overBound)
}

// uncommit undoes the record of committed name when the pool did not make
// its device (kerr): active snap is back as it was, and the device goes as
// after any failed commit. Should this fail, the next start finishes the
// commit instead.
func (s *Snapshotter) uncommit(ctx context.Context, name string, snap storage.Snapshot, kerr error) error {
	err := s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.RemoveWarm(snap.DeviceID); err != nil {
			return err
		}
		if _, err := tx.RemoveSnapshot(name); err != nil {
			return err
		}
		_, err := tx.CreateSnapshot(snap)
		return err
	})
	if err != nil {
		return fmt.Errorf("undo the record of committed %q (the next start finishes the commit): %w", name, err)
	}
	return s.dropCommitDevice(ctx, snap, kerr)
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
