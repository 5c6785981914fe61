package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Warm devices. Activating a thin device costs the kernel ~20 ms and
// removing one ~40 ms, far more than a snapshot (~3 ms). Commit therefore
// keeps the active snapshot's device: the committed snapshot gets a fresh
// snapshot of it, and the device, still active and holding exactly the
// committed content, waits as a warm device (a journal entry, OpWarm) for
// the committed snapshot's next child. During an unpack every Commit is
// followed by the Prepare of the next layer, which then takes the device
// in one database transaction. Warm devices are invisible to clients,
// bounded in number (maxWarm), deleted by the worker once idle (warmIdle),
// by Drain and Close, with their parent, and by recovery after a crash.
// Unused, one costs an active dm device and no pool space, so it waits
// minutes: containers of one image (every pod's pause image) are seldom
// started seconds apart.
const (
	maxWarm  = 8
	warmIdle = 10 * time.Minute
)

// takeWarm makes active snapshot key, child of committed parent, from a warm
// device of parent. ok is false when there is none to take: the caller
// makes a device the slow way.
func (s *Snapshotter) takeWarm(ctx context.Context, key, parent string, labels map[string]string) (snap storage.Snapshot, ok bool, err error) {
	var (
		warm storage.Entry
		p    storage.Snapshot
	)
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		entries, err := tx.Journal()
		if err != nil {
			return err
		}
		for _, e := range entries {
			if e.Op == storage.OpWarm && e.Key == parent {
				warm = e
			}
		}
		if warm.Seq == 0 {
			return nil
		}
		p, err = tx.GetSnapshot(parent)
		return err
	}); err != nil || warm.Seq == 0 {
		return snap, false, err
	}
	// A larger max-size label needs a larger device: made the slow way.
	if want, err := requestedSize(labels, p.Size); warm.Size != p.Size || err != nil || want > p.Size {
		return snap, false, nil
	}
	// Handed out it is mounted by its new owner: it must not be open
	// now, and what it maps now is all shared with parent.
	dev := s.deviceName(warm.DeviceID)
	if info, err := s.pool.Info(dev); err != nil || info.OpenCount > 0 || info.Suspended {
		return snap, false, nil
	}
	st, err := s.pool.ThinStatus(dev)
	if err != nil {
		return snap, false, nil
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		// The worker may have taken it for deletion meanwhile.
		if e, err := tx.GetJournal(warm.Seq); err != nil || e.Op != storage.OpWarm {
			if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			return nil
		}
		if err := tx.FinishJournal(warm.Seq); err != nil {
			return err
		}
		snap, err = tx.CreateSnapshot(storage.Snapshot{
			Key: key, Kind: snapshots.KindActive, Parent: parent, Labels: labels,
			State: storage.StateReady, DeviceID: warm.DeviceID, Size: p.Size, FSType: p.FSType,
			Shared: uint64(st.MappedSectors),
		})
		if err != nil {
			return err
		}
		ok = true
		return nil
	})
	return snap, ok && err == nil, err
}

// warmToDelete turns the warm entries drop picks into removals in tx; drop
// sees each entry with the number of warm entries newer than it. The
// caller finishes the returned removals.
func warmToDelete(tx *storage.Tx, drop func(e storage.Entry, newer int) bool) ([]storage.Entry, error) {
	entries, err := tx.Journal()
	if err != nil {
		return nil, err
	}
	var warm []storage.Entry
	for _, e := range entries {
		if e.Op == storage.OpWarm {
			warm = append(warm, e)
		}
	}
	var out []storage.Entry
	for i, e := range warm { // oldest first
		if !drop(e, len(warm)-1-i) {
			continue
		}
		if err := tx.FinishJournal(e.Seq); err != nil {
			return nil, err
		}
		// Never written: its blocks are its layer's.
		d := storage.Entry{Op: storage.OpDelete, DeviceID: e.DeviceID, OriginID: e.OriginID, Key: e.Key, Size: e.Size}
		if d.Seq, err = tx.AddJournal(d); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// overBound picks the warm entries beyond the newest maxWarm.
func overBound(_ storage.Entry, newer int) bool { return newer >= maxWarm }

// reclaimWarm deletes the warm devices drop picks.
func (s *Snapshotter) reclaimWarm(ctx context.Context, drop func(e storage.Entry, newer int) bool) error {
	var dels []storage.Entry
	if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		dels, err = warmToDelete(tx, drop)
		return err
	}); err != nil {
		return err
	}
	return s.finishDeletes(ctx, dels)
}

func (s *Snapshotter) finishDeletes(ctx context.Context, dels []storage.Entry) error {
	var errs []error
	for _, e := range dels {
		if err := s.finishDelete(ctx, e); err != nil && !errdefs.IsUnavailable(err) {
			errs = append(errs, fmt.Errorf("device %d (%s of %q): %w", e.DeviceID, e.Op, e.Key, err))
		}
	}
	return errors.Join(errs...)
}

// commitSnap is Commit: the committed snapshot gets a new device, a
// snapshot of the active's, and the active's device stays as a warm
// device of the committed snapshot.
func (s *Snapshotter) commitSnap(ctx context.Context, name, key string, opts []snapshots.Opt) error {
	snap, err := s.ready(ctx, key)
	if err != nil {
		return err
	}
	if snap.Kind != snapshots.KindActive {
		return fmt.Errorf("snapshot %q is %s, only active snapshots can be committed: %w", key, snap.Kind, errdefs.ErrFailedPrecondition)
	}
	dev := s.deviceName(snap.DeviceID)
	info, err := s.pool.Info(dev)
	if err != nil {
		return fmt.Errorf("device of %q: %w", key, err)
	}
	if info.OpenCount > 0 {
		return fmt.Errorf("device %s of %q is still open (mounted?): %w", dev, key, errdefs.ErrFailedPrecondition)
	}
	st, err := s.pool.ThinStatus(dev)
	if err != nil {
		return fmt.Errorf("usage of %q: %w", key, err)
	}
	usage := ownUsage(st.MappedSectors, snap.Shared)

	entry, journal, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		cur, err := tx.GetSnapshot(key)
		if err != nil {
			return storage.Entry{}, err
		}
		if cur.DeviceID != snap.DeviceID || cur.State != storage.StateReady || cur.Kind != snapshots.KindActive {
			return storage.Entry{}, fmt.Errorf("snapshot %q changed during commit: %w", key, errdefs.ErrAborted)
		}
		if _, err := tx.GetSnapshot(name); err == nil {
			return storage.Entry{}, fmt.Errorf("snapshot %q: %w", name, errdefs.ErrAlreadyExists)
		} else if !errdefs.IsNotFound(err) {
			return storage.Entry{}, err
		}
		id, err := tx.AllocateID()
		return storage.Entry{Op: storage.OpCommitSnap, DeviceID: id, OriginID: snap.DeviceID, Key: key, Name: name, Size: snap.Size}, err
	})
	if journal != nil {
		return journal
	}
	if err != nil {
		// An id the pool already has is someone else's device.
		return errors.Join(fmt.Errorf("commit %q: %w", key, err), s.rollbackCommit(ctx, entry, !dmsetup.IsExist(err)))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.CommitActiveOnto(key, name, entry.DeviceID, usage, opts...); err != nil {
			return err
		}
		if err := tx.FinishJournal(entry.Seq); err != nil {
			return err
		}
		if _, err := tx.AddJournal(storage.Entry{Op: storage.OpWarm, DeviceID: snap.DeviceID, OriginID: entry.DeviceID, Key: name, Size: snap.Size}); err != nil {
			return err
		}
		var err error
		dels, err = warmToDelete(tx, overBound)
		return err
	})
	if err != nil {
		// Still active in the records (a name taken meanwhile, say).
		return errors.Join(err, s.rollbackCommit(ctx, entry, true))
	}
	if len(dels) > 0 {
		s.kick()
	}
	return nil
}

// rollbackCommit deletes the committed snapshot's new device of a failed
// commit (unless made is false: the pool never made it) and frees its id;
// the active snapshot keeps its device. When the pool refuses, the journal
// keeps the entry and recovery finishes it.
func (s *Snapshotter) rollbackCommit(ctx context.Context, e storage.Entry, made bool) error {
	s.poolMu.Lock()
	// A failed resume (or a crash) after the snapshot left the active's
	// device suspended: it would hang its users.
	origin := s.deviceName(e.OriginID)
	var err error
	if info, ierr := s.pool.Info(origin); ierr == nil && info.Suspended {
		err = s.pool.Resume(origin)
	}
	if made {
		err = errors.Join(err, ignoreNoData(s.pool.DeleteThin(e.DeviceID)))
	}
	s.poolMu.Unlock()
	if err != nil {
		return fmt.Errorf("rolling back the commit of %q (recovery finishes it): %w", e.Key, err)
	}
	return s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := tx.ReleaseID(e.DeviceID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
}

// warmDevices lists the warm entries, for tests and Check.
func warmDevices(entries []storage.Entry) map[uint32]storage.Entry {
	out := map[uint32]storage.Entry{}
	for _, e := range entries {
		if e.Op == storage.OpWarm {
			out[e.DeviceID] = e
		}
	}
	return out
}

// maxChildCounts bounds the map of Prepares per parent: past it, the
// counts start again.
const maxChildCounts = 4096

// tookWarm notes that a Prepare on parent took its warm device, and asks
// for the next one when it was not parent's first child: a layer in an
// unpack gets one child (its next layer), an image's top layer many (its
// containers), and they should not wait for an activation either.
func (s *Snapshotter) tookWarm(parent string) {
	if s.countChild(parent) > 1 {
		s.wantWarm(parent)
	}
}

// countChild counts a Prepare on parent and returns how many it made.
func (s *Snapshotter) countChild(parent string) int {
	s.refillMu.Lock()
	defer s.refillMu.Unlock()
	if s.children == nil || len(s.children) >= maxChildCounts {
		s.children = map[string]int{}
	}
	s.children[parent]++
	return s.children[parent]
}

// wantWarm asks the worker for a warm device of parent.
func (s *Snapshotter) wantWarm(parent string) {
	s.refillMu.Lock()
	if s.refill == nil {
		s.refill = map[string]bool{}
	}
	s.refill[parent] = true
	s.refillMu.Unlock()
	s.kick()
}

// refillWarm makes the warm devices wantWarm asked for, while fewer than
// maxWarm wait and the pool is healthy.
func (s *Snapshotter) refillWarm(ctx context.Context) {
	s.refillMu.Lock()
	parents := s.refill
	s.refill, s.refilling = nil, true
	s.refillMu.Unlock()
	defer func() {
		s.refillMu.Lock()
		s.refilling = false
		s.refillMu.Unlock()
	}()
	for parent := range parents {
		if ctx.Err() != nil {
			return
		}
		s.calls.pause(ctx, time.Now().Add(maxDefer))
		if ctx.Err() != nil {
			return
		}
		// Once begun, finished even when Close stops the worker: a
		// half-made device would stay journaled until the next start.
		if err := s.makeWarm(context.WithoutCancel(ctx), parent); err != nil {
			log.G(ctx).WithError(err).WithField("parent", parent).Debug("no warm device made")
		}
	}
}

// makeWarm makes one warm device of committed parent, unless it has one or
// maxWarm wait. It is journaled like a Prepare's device without a record
// (recovery deletes it) until it becomes a warm entry.
func (s *Snapshotter) makeWarm(ctx context.Context, parent string) error {
	if err := s.checkPoolHealth(ctx); err != nil {
		return err
	}
	var p storage.Snapshot
	entry, journal, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		entries, err := tx.Journal()
		if err != nil {
			return storage.Entry{}, err
		}
		warm := warmDevices(entries)
		if len(warm) >= maxWarm {
			return storage.Entry{}, errSkip
		}
		for _, e := range warm {
			if e.Key == parent {
				return storage.Entry{}, errSkip
			}
		}
		if p, err = tx.GetSnapshot(parent); err != nil {
			return storage.Entry{}, err
		}
		if p.Kind != snapshots.KindCommitted || p.State != storage.StateReady {
			return storage.Entry{}, fmt.Errorf("parent %q is not a ready committed snapshot: %w", parent, errdefs.ErrFailedPrecondition)
		}
		id, err := tx.AllocateID()
		return storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: p.DeviceID, Size: p.Size}, err
	})
	if errors.Is(journal, errSkip) {
		return nil
	}
	if journal != nil {
		return journal
	}
	name := s.deviceName(entry.DeviceID)
	if err == nil {
		err = s.timed(StepActivate, func() error {
			return s.pool.Activate(name, entry.DeviceID, dmsetup.BytesToSectors(p.Size), false)
		})
		if err != nil {
			err = errors.Join(err, s.pool.Deactivate(ctx, name))
			s.poolMu.Lock()
			err = errors.Join(err, ignoreNoData(s.pool.DeleteThin(entry.DeviceID)))
			s.poolMu.Unlock()
		}
	}
	if err != nil {
		// A snapshot the pool refused made nothing to delete.
		return errors.Join(err, s.rollbackCreate(ctx, entry, false))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if err := tx.FinishJournal(entry.Seq); err != nil {
			return err
		}
		// Removed (or replaced) meanwhile: the device goes too.
		op := storage.OpWarm
		if cur, err := tx.GetSnapshot(parent); err != nil || cur.DeviceID != p.DeviceID || cur.State != storage.StateReady {
			if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			op = storage.OpDelete
		}
		w := storage.Entry{Op: op, DeviceID: entry.DeviceID, Key: parent, Size: p.Size}
		if op == storage.OpWarm {
			// Not when parent's device is gone already: then this one
			// may be the last to hold its blocks, and is discarded.
			w.OriginID = p.DeviceID
		}
		var err error
		if w.Seq, err = tx.AddJournal(w); err != nil {
			return err
		}
		if op == storage.OpDelete {
			dels = append(dels, w)
			return nil
		}
		more, err := warmToDelete(tx, overBound)
		dels = append(dels, more...)
		return err
	})
	if err != nil {
		return err
	}
	return s.finishDeletes(ctx, dels)
}
