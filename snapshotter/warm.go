package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Warm devices. Activating a thin device costs the kernel ~20 ms and
// removing one ~40 ms, far more than a snapshot (~3 ms). So Commit keeps
// the active snapshot's device: the committed snapshot gets a fresh
// snapshot of it, and the device, still active and holding exactly the
// committed content, is recorded as a warm device (storage.Warm) of the
// committed snapshot. The committed snapshot's next child takes it in one
// database transaction. During an unpack every Commit is followed by the
// Prepare of the next layer, which takes it at once.
//
// Warm devices are invisible to clients and bounded in number (maxWarm):
// each new one pushes the oldest out. The worker makes more when a
// layer's children keep coming (containers of one image), a View of a
// layer without one makes one at once for the Prepare that mostly follows
// (warmAhead), and the worker deletes those unused for warmIdle. Drain and
// Close delete them all, a layer's go with it, and recovery deletes those
// a crash left.
// An unused one costs an active dm device and no pool space, so it may
// wait minutes: containers of one image (every pod's pause image) are
// seldom started seconds apart.
const (
	maxWarm  = 8
	warmIdle = 10 * time.Minute
)

// takeWarm makes active snapshot key, child of committed parent, from a warm
// device of parent. ok is false when there is none to take: the caller
// makes a device the slow way.
func (s *Snapshotter) takeWarm(ctx context.Context, key, parent string, labels map[string]string) (snap storage.Snapshot, ok bool, err error) {
	w, p, found, err := s.warmOf(ctx, parent)
	if err != nil || !found {
		return snap, false, err
	}
	// A larger max-size label needs a larger device: made the slow way.
	if want, err := requestedSize(labels, p.Size); w.Size != p.Size || err != nil || want > p.Size {
		return snap, false, nil
	}
	// The new snapshot's owner mounts the device, so it must not be open
	// now; what it maps now is all shared with parent.
	dev := s.deviceName(w.DeviceID)
	if info, err := s.pool.Info(dev); err != nil || info.OpenCount > 0 || info.Suspended {
		return snap, false, nil
	}
	st, err := s.pool.ThinStatus(dev)
	if err != nil {
		return snap, false, nil
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		ok = false // the transaction may run again
		// The worker may have taken it for deletion meanwhile.
		if _, err := tx.RemoveWarm(w.DeviceID); errdefs.IsNotFound(err) {
			return nil
		} else if err != nil {
			return err
		}
		commitID, err := tx.AllocateID()
		if err != nil {
			return err
		}
		snap, err = tx.CreateSnapshot(storage.Snapshot{
			Key: key, Kind: snapshots.KindActive, Parent: parent, Labels: labels,
			State: storage.StateReady, DeviceID: w.DeviceID, Size: p.Size, FSType: p.FSType,
			Shared: uint64(st.MappedSectors), CommitID: commitID,
		})
		ok = err == nil
		return err
	})
	return snap, ok && err == nil, err
}

// warmOf returns the newest warm device of parent and parent's record;
// found is false when parent has none.
func (s *Snapshotter) warmOf(ctx context.Context, parent string) (w storage.Warm, p storage.Snapshot, found bool, err error) {
	err = s.db.View(ctx, func(tx *storage.Tx) error {
		ws, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		for _, c := range ws {
			if c.Parent == parent {
				w, found = c, true
			}
		}
		if !found {
			return nil
		}
		p, err = tx.GetSnapshot(parent)
		return err
	})
	return w, p, found && err == nil, err
}

// warmToDelete turns warm device w into a journaled removal in tx. It was
// never written, so its parent's device holds all its blocks.
func warmToDelete(tx *storage.Tx, w storage.Warm) (storage.Entry, error) {
	if _, err := tx.RemoveWarm(w.DeviceID); err != nil {
		return storage.Entry{}, err
	}
	e := storage.Entry{Op: storage.OpDelete, DeviceID: w.DeviceID, OriginID: w.OriginID, Key: w.Parent, Size: w.Size}
	var err error
	e.Seq, err = tx.AddJournal(e)
	return e, err
}

// dropWarm turns the warm devices pick chooses into removals in tx; pick
// sees each with the number of warm devices newer than it. The caller
// finishes the returned removals.
func dropWarm(tx *storage.Tx, pick func(w storage.Warm, newer int) bool) ([]storage.Entry, error) {
	ws, err := tx.WarmDevices()
	if err != nil {
		return nil, err
	}
	var out []storage.Entry
	for i, w := range ws { // oldest first
		if !pick(w, len(ws)-1-i) {
			continue
		}
		e, err := warmToDelete(tx, w)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// overBound picks the warm devices beyond the newest maxWarm.
func overBound(_ storage.Warm, newer int) bool { return newer >= maxWarm }

// makeWarm makes one warm device of committed parent, unless it has one.
// When maxWarm wait, the oldest goes: a device is only made for a layer
// whose children are coming, so it is likelier to be taken than one left
// by an unpack's last Commit. Until it is recorded warm it is journaled
// like a Prepare's device without a record, which recovery deletes. A
// device made ahead of a Prepare (warmAhead) hands that removal to the
// worker.
func (s *Snapshotter) makeWarm(ctx context.Context, parent string, ahead bool) error {
	if err := s.checkPoolHealth(ctx); err != nil {
		return err
	}
	var (
		p    storage.Snapshot
		skip bool
	)
	entry, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		var err error
		if p, skip, err = warmWanted(tx, parent); err != nil {
			return storage.Entry{}, err
		}
		if skip {
			return storage.Entry{}, errNoWarmNeeded
		}
		id, err := tx.AllocateID()
		return storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: p.DeviceID, Size: p.Size}, err
	})
	if skip {
		return nil
	}
	if err == nil {
		err = s.activate(s.deviceName(entry.DeviceID), entry.DeviceID, p.Size, false)
	}
	if err != nil {
		if entry.Seq == 0 {
			return err
		}
		return errors.Join(err, s.undo(ctx, entry, !dmsetup.IsExist(err)))
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		if err := tx.FinishJournal(entry.Seq); err != nil {
			return err
		}
		dels, err = recordWarm(tx, parent, p, entry.DeviceID)
		return err
	})
	if err != nil {
		return err
	}
	if ahead && len(dels) > 0 {
		// The Prepare waiting for this device should not also wait for
		// the removal of the one it pushed over the bound.
		s.kick()
		return nil
	}
	return s.finishDeletes(ctx, dels)
}

// errNoWarmNeeded ends makeWarm's journal transaction without an entry.
var errNoWarmNeeded = errors.New("no warm device needed")

// warmWanted returns parent's record if a warm device of it is wanted:
// parent is a ready committed snapshot without one. skip says none is
// wanted.
func warmWanted(tx *storage.Tx, parent string) (p storage.Snapshot, skip bool, err error) {
	ws, err := tx.WarmDevices()
	if err != nil {
		return p, false, err
	}
	if hasWarm(ws, parent) {
		return p, true, nil
	}
	if p, err = tx.GetSnapshot(parent); err != nil {
		return p, false, err
	}
	if p.Kind != snapshots.KindCommitted || p.State != storage.StateReady {
		return p, false, fmt.Errorf("parent %q is not a ready committed snapshot: %w", parent, errdefs.ErrFailedPrecondition)
	}
	return p, false, nil
}

// recordWarm records device id, just made from p's device, as a warm
// device of parent in tx, and returns the removals this makes: the device
// itself when parent was removed or replaced meanwhile, or the warm
// devices over the bound.
func recordWarm(tx *storage.Tx, parent string, p storage.Snapshot, id uint32) ([]storage.Entry, error) {
	cur, err := tx.GetSnapshot(parent)
	if err != nil && !errdefs.IsNotFound(err) {
		return nil, err
	}
	if err != nil || cur.DeviceID != p.DeviceID || cur.State != storage.StateReady {
		// Parent's device may be gone already, so this one may be the
		// last to hold its blocks: no origin, so it is discarded.
		e := storage.Entry{Op: storage.OpDelete, DeviceID: id, Key: parent, Size: p.Size}
		e.Seq, err = tx.AddJournal(e)
		return []storage.Entry{e}, err
	}
	if err := tx.AddWarm(storage.Warm{DeviceID: id, Parent: parent, OriginID: p.DeviceID, Size: p.Size}); err != nil {
		return nil, err
	}
	return dropWarm(tx, overBound)
}

// hasWarm says whether ws holds a warm device of parent.
func hasWarm(ws []storage.Warm, parent string) bool {
	return slices.ContainsFunc(ws, func(w storage.Warm) bool { return w.Parent == parent })
}
