package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// errNoLayer: no committed snapshot holds the layer, it must be unpacked.
var errNoLayer = errors.New("layer not held")

// errSkip ends a walk early.
var errSkip = errors.New("skip")

// shareLayer answers the Prepare containerd makes before unpacking a layer
// (label containerd.io/snapshot.ref = its chain id) when a committed
// snapshot of any class or containerd namespace holds that chain already:
// it records committed snapshot key, a child of parent carrying labels,
// on a thin snapshot of that layer's device, and returns AlreadyExists.
// containerd then finds it by Walk (label and parent) and skips the
// download and the apply. errNoLayer means there is nothing to share.
func (s *Snapshotter) shareLayer(ctx context.Context, key, parent, chain string, labels map[string]string) error {
	var (
		src      storage.Snapshot
		existing string
		entry    storage.Entry
		journal  error
	)
	s.poolMu.Lock()
	err := func() error {
		// Under poolMu: a removal of src deletes its device under
		// poolMu too, so the device is there until create_snap.
		journal = s.db.Update(ctx, func(tx *storage.Tx) error {
			found := false
			if err := tx.WalkSnapshots(func(c storage.Snapshot) error {
				if c.State != storage.StateReady || c.Kind != snapshots.KindCommitted || c.Labels[snapshots.LabelSnapshotRef] != chain {
					return nil
				}
				if c.Parent == parent && keySpace(c.Key) == keySpace(key) {
					// containerd's Walk (same key space, same
					// parent) finds this one: nothing to make.
					existing = c.Key
					return errSkip
				}
				if !found {
					src, found = c, true
				}
				return nil
			}); err != nil && !errors.Is(err, errSkip) {
				return err
			}
			if existing != "" {
				return errSkip
			}
			if !found {
				return errNoLayer
			}
			id, err := tx.AllocateID()
			if err != nil {
				return err
			}
			if _, err := tx.CreateSnapshot(storage.Snapshot{
				Key: key, Kind: snapshots.KindCommitted, Parent: parent, Labels: labels,
				State: storage.StateCreating, DeviceID: id, Size: src.Size, FSType: src.FSType, Usage: src.Usage,
			}); err != nil {
				return err
			}
			entry = storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: src.DeviceID, Key: key}
			entry.Seq, err = tx.AddJournal(entry)
			return err
		})
		if journal != nil {
			return journal
		}
		return s.snapLocked(entry.DeviceID, entry.OriginID)
	}()
	s.poolMu.Unlock()
	if errors.Is(journal, errSkip) {
		s.sharedLayers.Add(1)
		return fmt.Errorf("layer %s held as %q: %w", chain, existing, errdefs.ErrAlreadyExists)
	}
	if journal != nil {
		return journal
	}
	if err != nil {
		if rerr := s.rollbackCreate(ctx, entry, false); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Error("rolling back a failed layer share")
		}
		return fmt.Errorf("share layer %s from %q: %w", chain, src.Key, err)
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.SetState(key, storage.StateReady); err != nil {
			return err
		}
		return tx.FinishJournal(entry.Seq)
	})
	if err != nil {
		return err
	}
	s.sharedLayers.Add(1)
	log.G(ctx).WithField("key", key).WithField("from", src.Key).WithField("chain", chain).Debug("layer shared instead of unpacked")
	return fmt.Errorf("layer %s shared from %q as %q: %w", chain, src.Key, key, errdefs.ErrAlreadyExists)
}

// SharedLayers is how many unpacks layer sharing saved since the
// snapshotter opened.
func (s *Snapshotter) SharedLayers() uint64 { return s.sharedLayers.Load() }
