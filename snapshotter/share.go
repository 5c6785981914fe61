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

// errNoLayer: no committed snapshot holds the layer, it must be unpacked.
var errNoLayer = errors.New("layer not held")

// errLayerHeld: containerd will find the layer under the key it names.
var errLayerHeld = errors.New("layer held")

// shareLayer answers the Prepare containerd makes before unpacking a layer
// (label containerd.io/snapshot.ref = its chain id) when a committed
// snapshot of any class or containerd namespace holds that chain already:
// it records committed snapshot key, a child of parent carrying labels,
// on a thin snapshot of that layer's device, and returns AlreadyExists.
// containerd then finds it by Walk (label and parent) and skips the
// download and the apply. errNoLayer means there is nothing to share.
//
// The layer is chosen in the journal's transaction, before poolMu is
// taken, so a removal of it may delete its device before the snapshot.
// The pool then refuses the snapshot (ENODATA) and the search runs again.
func (s *Snapshotter) shareLayer(ctx context.Context, key, parent, chain string, labels map[string]string) error {
	for attempt := 1; ; attempt++ {
		var src storage.Snapshot
		var held string
		entry, err := s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
			var err error
			if src, held, err = findLayer(tx, key, parent, chain); err != nil {
				return storage.Entry{}, err
			}
			return shareEntry(tx, key, parent, labels, src)
		})
		switch {
		case errors.Is(err, errLayerHeld):
			s.admin.sharedLayers.Add(1)
			return fmt.Errorf("layer %s held as %q: %w", chain, held, errdefs.ErrAlreadyExists)
		case err != nil && entry.Seq == 0:
			return err // errNoLayer, or nothing journaled
		case err != nil:
			logUndo(ctx, s.undo(ctx, entry, !dmsetup.IsExist(err)), key)
			if dmsetup.IsNotFound(err) && attempt < maxIDTries {
				continue // the source's device went meanwhile
			}
			return fmt.Errorf("share layer %s from %q: %w", chain, src.Key, err)
		}
		if err := s.db.Update(ctx, func(tx *storage.Tx) error {
			if _, err := tx.SetState(key, storage.StateReady); err != nil {
				return err
			}
			return tx.FinishJournal(entry.Seq)
		}); err != nil {
			return err
		}
		s.admin.sharedLayers.Add(1)
		log.G(ctx).WithField("key", key).WithField("from", src.Key).WithField("chain", chain).Debug("layer shared instead of unpacked")
		return fmt.Errorf("layer %s shared from %q as %q: %w", chain, src.Key, key, errdefs.ErrAlreadyExists)
	}
}

// findLayer returns a ready committed snapshot holding chain. held names
// the one containerd finds itself (same key space, same parent), with
// errLayerHeld; errNoLayer means none holds it.
func findLayer(tx *storage.Tx, key, parent, chain string) (src storage.Snapshot, held string, err error) {
	found := false
	err = tx.WalkSnapshots(func(c storage.Snapshot) error {
		if c.State != storage.StateReady || c.Kind != snapshots.KindCommitted || c.Labels[snapshots.LabelSnapshotRef] != chain {
			return nil
		}
		if c.Parent == parent && keySpace(c.Key) == keySpace(key) {
			held = c.Key
			return errLayerHeld
		}
		if !found {
			src, found = c, true
		}
		return nil
	})
	if err == nil && !found {
		err = errNoLayer
	}
	return src, held, err
}

// shareEntry records committed snapshot key, creating, on a new id in tx,
// and returns the journal entry of its snapshot of src's device.
func shareEntry(tx *storage.Tx, key, parent string, labels map[string]string, src storage.Snapshot) (storage.Entry, error) {
	id, err := tx.AllocateID()
	if err != nil {
		return storage.Entry{}, err
	}
	if _, err := tx.CreateSnapshot(storage.Snapshot{
		Key: key, Kind: snapshots.KindCommitted, Parent: parent, Labels: labels,
		State: storage.StateCreating, DeviceID: id, Size: src.Size, FSType: src.FSType, Usage: src.Usage,
	}); err != nil {
		return storage.Entry{}, err
	}
	return storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: src.DeviceID, Key: key}, nil
}

// SharedLayers is how many unpacks layer sharing saved since the
// snapshotter opened.
func (s *Snapshotter) SharedLayers() uint64 { return s.admin.sharedLayers.Load() }
