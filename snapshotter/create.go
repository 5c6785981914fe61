package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Prepare creates an active snapshot of parent (or of the empty base).
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if err := checkDefaultKey(key); err != nil {
		return nil, err
	}
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if err := checkDefaultKey(key); err != nil {
		return nil, err
	}
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

// create makes snapshot key of kind, in the first way that applies: a
// view on its layer's device (view.go), a shared layer (share.go), a warm
// device of parent (warm.go), or a new device.
func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	defer s.bg.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()
	// The pool may fail while the call runs.
	defer func() { err = s.blameFault(err) }()
	if err := s.checkPoolHealth(ctx); err != nil {
		return nil, err
	}
	if parent != "" {
		// A Commit may be making parent's device (commitAtOnce).
		if err := s.bg.committing.wait(ctx, parent); err != nil {
			return nil, err
		}
	}
	if chain := base.Labels[snapshots.LabelSnapshotRef]; chain != "" && kind == snapshots.KindActive {
		if err := s.shareLayer(ctx, key, parent, chain, base.Labels); !errors.Is(err, errNoLayer) {
			return nil, err
		}
	}
	if kind == snapshots.KindView && parent != "" {
		snap, p, err := s.createView(ctx, key, parent, base.Labels)
		if err != nil {
			return nil, err
		}
		return s.mounts(snap, p.DeviceID), nil
	}
	if kind == snapshots.KindActive && parent != "" {
		// A View may be making one for this Prepare (warmAhead).
		if err := s.bg.ahead.wait(ctx, parent); err != nil {
			return nil, err
		}
		snap, ok, err := s.takeWarm(ctx, key, parent, base.Labels)
		if err != nil {
			return nil, err
		}
		if ok {
			s.warmTaken(parent)
			return s.mounts(snap, snap.DeviceID), nil
		}
	}
	snap, err := s.createDevice(ctx, kind, key, parent, base.Labels)
	if err != nil {
		return nil, err
	}
	if kind == snapshots.KindActive && parent != "" {
		s.warmMissed(parent)
	}
	return s.mounts(snap, snap.DeviceID), nil
}

// createDevice makes snapshot key on a new device: a snapshot of parent's
// device (or the base), activated, its filesystem grown when the max-size
// label asks for a larger device. A failure leaves nothing behind.
func (s *Snapshotter) createDevice(ctx context.Context, kind snapshots.Kind, key, parent string, labels map[string]string) (storage.Snapshot, error) {
	var (
		snap newSnap
		grow bool // the device is larger than its origin's filesystem
	)
	entry, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		var err error
		snap, grow, err = newRecord(tx, kind, key, parent, labels)
		return storage.Entry{Op: storage.OpCreateSnap, DeviceID: snap.DeviceID, OriginID: snap.origin, Key: key}, err
	})
	if err == nil {
		err = s.activateNew(ctx, snap.Snapshot, grow)
	}
	if err != nil {
		if entry.Seq == 0 {
			return storage.Snapshot{}, err // nothing journaled
		}
		logUndo(ctx, s.undo(ctx, entry, !dmsetup.IsExist(err)), key)
		return storage.Snapshot{}, fmt.Errorf("create thin device for %q: %w", key, err)
	}
	// What the new device maps now is all shared with its origin.
	var shared uint64
	if st, err := s.pool.ThinStatus(s.deviceName(snap.DeviceID)); err == nil {
		shared = uint64(st.MappedSectors)
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.SetState(key, storage.StateReady); err != nil {
			return err
		}
		if _, err := tx.SetShared(key, shared); err != nil {
			return err
		}
		if kind == snapshots.KindActive {
			id, err := reserveCommitID(tx, key)
			if err != nil {
				return err
			}
			snap.CommitID = id
		}
		return tx.FinishJournal(entry.Seq)
	})
	snap.State = storage.StateReady
	return snap.Snapshot, err
}

// newSnap is a record being created and the device it is a snapshot of.
type newSnap struct {
	storage.Snapshot
	origin uint32
}

// newRecord allocates an id and records snapshot key, creating, in tx. Its
// device will be a snapshot of parent's (or of the base) with parent's
// size, or the larger size the max-size label asks of an active snapshot;
// grow says the label did.
func newRecord(tx *storage.Tx, kind snapshots.Kind, key, parent string, labels map[string]string) (newSnap, bool, error) {
	pi, err := tx.PoolInfo()
	if err != nil {
		return newSnap{}, false, err
	}
	origin, size, fsType := pi.BaseDeviceID, pi.BaseSize, pi.BaseFSType
	if parent != "" {
		p, err := tx.GetSnapshot(parent)
		if err != nil {
			return newSnap{}, false, fmt.Errorf("parent %q: %w", parent, err)
		}
		origin, size, fsType = p.DeviceID, p.Size, p.FSType
	}
	grow := false
	if kind == snapshots.KindActive {
		// Views are read-only: their filesystem cannot grow.
		want, err := requestedSize(labels, size)
		if err != nil {
			return newSnap{}, false, err
		}
		if grow = want > size; grow {
			size = want
		}
	}
	id, err := tx.AllocateID()
	if err != nil {
		return newSnap{}, false, err
	}
	snap, err := tx.CreateSnapshot(storage.Snapshot{
		Key: key, Kind: kind, Parent: parent, Labels: labels,
		State: storage.StateCreating, DeviceID: id, Size: size, FSType: fsType,
	})
	return newSnap{Snapshot: snap, origin: origin}, grow, err
}

// activateNew activates the new device of snap (read-only for a view) and,
// when grow is set, grows its filesystem to the device's size before anyone
// mounts it.
func (s *Snapshotter) activateNew(ctx context.Context, snap storage.Snapshot, grow bool) error {
	name := s.deviceName(snap.DeviceID)
	if err := s.activate(name, snap.DeviceID, snap.Size, snap.Kind == snapshots.KindView); err != nil {
		return err
	}
	if !grow {
		return nil
	}
	return s.timed(StepGrow, func() error { return s.growFS(ctx, s.pool.DevicePath(name), snap.FSType) })
}
