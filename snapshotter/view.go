package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
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
// s.layers, after the view's record is written: the first view activates
// it. When its last view goes, the device waits for the next one like a
// warm device, and the worker deactivates it after warmIdle (or beyond
// maxWarm), checking under the same lock that no view came back.

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
	name := s.deviceName(p.DeviceID)
	if info, err := s.pool.Info(name); err == nil && info.LiveTable && info.ReadOnly {
		return snap, p, nil // other views share it, or it waits for this one
	}
	err := s.activate(name, p.DeviceID, p.Size, true)
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

// releaseLayer notes that committed parent lost a view. Its device stays
// active while views share it; once none does, it waits for the layer's
// next view like a warm device, and the worker deactivates it when it has
// waited warmIdle or more than maxWarm wait (reclaimLayers). So a Remove of
// a view costs one database transaction, and the next View of the layer
// none.
func (s *Snapshotter) releaseLayer(parent string) {
	s.bg.idleLayers.add(parent, time.Now())
}

// reclaimLayers deactivates the devices of layers that lost their last view
// and were picked by pick (it sees when they were released and how many
// were released after them), unless a view came back meanwhile. A device
// still open (a view mounted after its removal) stays; check reports it.
func (s *Snapshotter) reclaimLayers(ctx context.Context, pick func(released time.Time, newer int) bool) {
	for _, parent := range s.bg.idleLayers.pick(pick) {
		if err := s.deactivateLayer(ctx, parent); err != nil {
			log.G(ctx).WithError(err).WithField("layer", parent).Warn("the device of a layer without views stays active")
		}
	}
}

// deactivateLayer deactivates the device of committed parent if no view
// shares it.
func (s *Snapshotter) deactivateLayer(ctx context.Context, parent string) error {
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
	if errdefs.IsNotFound(err) || views > 0 {
		return nil // removed (its device goes with it), or viewed again
	}
	if err != nil {
		return err
	}
	return s.deactivate(ctx, p.DeviceID)
}

// idleLayers are the layers whose read-only device lost its last view, by
// when, for the worker to deactivate.
type idleLayers struct {
	mu       sync.Mutex
	released map[string]time.Time
}

func (l *idleLayers) add(parent string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released == nil {
		l.released = map[string]time.Time{}
	}
	l.released[parent] = at
}

// pick removes and returns the layers pick chooses, oldest first.
func (l *idleLayers) pick(pick func(released time.Time, newer int) bool) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := slices.SortedFunc(maps.Keys(l.released), func(a, b string) int { return l.released[a].Compare(l.released[b]) })
	var out []string
	for i, k := range keys {
		if pick(l.released[k], len(keys)-1-i) {
			out = append(out, k)
			delete(l.released, k)
		}
	}
	return out
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
