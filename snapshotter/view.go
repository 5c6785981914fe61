package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Views. A committed layer never changes, so its views need no device of
// their own: they share one read-only activation of the layer's device,
// which the layer's first view makes and its last one removes. A view is
// then one database transaction, and an activation for the first view of
// a layer; no pool message, no journal entry. The layer cannot go while
// views exist (a view is its child). Views of no parent (the empty base)
// get a device of their own, as every view made before did.
//
// Whether a layer's device is active is decided under the layer's lock in
// s.layers, after the view's record is written or removed: the first view
// activates it, and a removal deactivates it when it finds no view left.

// sharesDevice says whether snap is a view that uses its parent's device.
func sharesDevice(snap storage.Snapshot) bool {
	return snap.Kind == snapshots.KindView && snap.DeviceID == 0
}

// createView records view key of committed parent and makes sure the
// parent's device is active, read-only.
func (s *Snapshotter) createView(ctx context.Context, key, parent string, labels map[string]string) (storage.Snapshot, storage.Snapshot, error) {
	var snap, p storage.Snapshot
	if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		if p, err = tx.GetSnapshot(parent); err != nil {
			return fmt.Errorf("parent %q: %w", parent, err)
		}
		snap, err = tx.CreateSnapshot(storage.Snapshot{
			Key: key, Kind: snapshots.KindView, Parent: parent, Labels: labels,
			State: storage.StateReady, Size: p.Size, FSType: p.FSType,
		})
		return err
	}); err != nil {
		return snap, p, err
	}
	unlock := s.layers.lock(parent)
	defer unlock()
	err := s.activate(s.deviceName(p.DeviceID), p.DeviceID, p.Size, true)
	if err == nil {
		return snap, p, nil
	}
	err = fmt.Errorf("activate the device of %q for view %q: %w", parent, key, err)
	// Nothing else was made: the record goes. Should that fail, recovery
	// activates the device.
	return snap, p, errors.Join(err, s.db.Update(ctx, func(tx *storage.Tx) error {
		_, err := tx.RemoveSnapshot(key)
		return err
	}))
}

// releaseLayer deactivates the device of committed parent when no view
// shares it any more. A device still open (a view mounted after its
// removal) stays; check reports it stale and the next start removes it.
func (s *Snapshotter) releaseLayer(ctx context.Context, parent string) {
	unlock := s.layers.lock(parent)
	defer unlock()
	var (
		p     storage.Snapshot
		views int
	)
	err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if p, err = tx.GetSnapshot(parent); err != nil {
			return err
		}
		views, err = tx.SharedViews(parent)
		return err
	})
	if err == nil && views == 0 {
		err = s.deactivate(ctx, p.DeviceID)
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", parent).Warn("the device of a layer without views stays active")
	}
}

// deviceOf is the thin id whose device snap mounts: its own, or its
// parent's for a view that shares it.
func (s *Snapshotter) deviceOf(tx *storage.Tx, snap storage.Snapshot) (uint32, error) {
	if !sharesDevice(snap) {
		return snap.DeviceID, nil
	}
	p, err := tx.GetSnapshot(snap.Parent)
	if err != nil {
		return 0, fmt.Errorf("parent of view %q: %w", snap.Key, err)
	}
	return p.DeviceID, nil
}
