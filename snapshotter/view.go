package snapshotter

import (
	"context"
	"errors"
	"fmt"
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
// s.layers, held until the view's record is written: the first view
// activates it. When its last view goes, the device waits for the next one
// like a warm device, and the worker deactivates it after warmIdle (or
// beyond maxWarm), checking under the same lock that no view came back. A
// View also activates its layer's only committed child ahead of that
// child's view (activateAhead); the worker keeps at most maxWarm of those.

// sharesDevice says whether snap is a view that uses its parent's device.
func sharesDevice(snap storage.Snapshot) bool {
	return snap.Kind == snapshots.KindView && snap.DeviceID == 0
}

// createView records view key of committed parent and makes sure the
// parent's device is active, read-only. The record is written while the
// device activates: each waits tens of milliseconds (an fsync, an RCU grace
// period), and the call waits for the longer. The device is checked and
// activated under the layer's lock, held until the record is written, so
// the worker cannot deactivate the device between them; the record may
// begin before the lock is free (a layer being activated ahead).
func (s *Snapshotter) createView(ctx context.Context, key, parent string, labels map[string]string) (storage.Snapshot, storage.Snapshot, error) {
	p, ok, warm, err := s.viewable(ctx, key, parent)
	if err != nil || !ok {
		// The record's transaction gives the error.
		snap, err := s.recordView(ctx, key, parent, labels, err)
		return snap, p, err
	}
	type result struct {
		snap storage.Snapshot
		err  error
	}
	rec := make(chan result, 1)
	go func() {
		snap, err := s.recordView(ctx, key, parent, labels, nil)
		if err == nil {
			// After the record: its transaction would wait for the
			// warm device's journal entry.
			if !warm {
				s.warmAhead(ctx, parent)
			}
			s.activateAhead(ctx, parent)
		}
		rec <- result{snap, err}
	}()
	unlock := s.layers.lock(parent)
	defer unlock()
	name := s.deviceName(p.DeviceID)
	var aerr error
	made := false
	if info, err := s.pool.Info(name); err != nil || !info.LiveTable || !info.ReadOnly {
		// Not shared by other views, nor waiting for this one.
		aerr = s.activate(name, p.DeviceID, p.Size, true)
		made = aerr == nil
	}
	r := <-rec
	if r.err != nil {
		if made {
			// No view shares a device this call activated.
			r.err = errors.Join(r.err, s.deactivate(ctx, p.DeviceID))
		}
		return r.snap, p, r.err
	}
	if aerr == nil {
		return r.snap, p, nil
	}
	aerr = fmt.Errorf("activate the device of %q for view %q: %w", parent, key, aerr)
	// Nothing else was made: the record goes. Should that fail, recovery
	// activates the device.
	return r.snap, p, errors.Join(aerr, s.db.Update(ctx, func(tx *storage.Tx) error {
		_, err := tx.RemoveSnapshot(key)
		return err
	}))
}

// activateAhead activates, read-only and in a goroutine of its own, the
// device of viewed parent's only committed child: the next layer of its
// image. Views walk an image's layers in order (a differ, an exporter, a
// scanner), so the child's View then costs one transaction instead of
// waiting for an activation. The worker deactivates the device after
// warmIdle, and at once when more than maxWarm devices activated ahead
// wait: nobody asked for them. It is finished even when Close stops the
// background work.
func (s *Snapshotter) activateAhead(ctx context.Context, parent string) {
	var child storage.Snapshot
	err := s.db.View(ctx, func(tx *storage.Tx) error {
		c, ok, err := tx.OnlyCommittedChild(parent)
		if ok && c.State == storage.StateReady {
			child = c
		}
		return err
	})
	if err != nil || child.Key == "" {
		return
	}
	s.bg.activating.goAhead(ctx, child.Key, &s.bg.wg, "layer not activated ahead of its view", func(ctx context.Context) error {
		return s.activateLayer(ctx, child.Key)
	})
}

// activateLayer activates committed layer key's device read-only, unless it
// is active, and leaves it to the worker as a layer activated ahead.
func (s *Snapshotter) activateLayer(ctx context.Context, key string) error {
	unlock := s.layers.lock(key)
	defer unlock()
	layer := func() (p storage.Snapshot, err error) {
		err = s.db.View(ctx, func(tx *storage.Tx) (err error) {
			p, err = tx.GetSnapshot(key)
			return err
		})
		return p, err
	}
	p, err := layer()
	if err != nil || p.Kind != snapshots.KindCommitted || p.State != storage.StateReady {
		return err
	}
	name := s.deviceName(p.DeviceID)
	if info, err := s.pool.Info(name); err == nil && info.LiveTable && info.ReadOnly {
		return nil
	}
	if err := s.activate(name, p.DeviceID, p.Size, true); err != nil {
		return err
	}
	// Removed meanwhile: its removal may have found no device to
	// deactivate.
	if cur, err := layer(); err != nil || cur.DeviceID != p.DeviceID {
		return errors.Join(err, s.deactivate(ctx, p.DeviceID))
	}
	s.bg.idleLayers.add(idleLayer{key: key, released: time.Now(), ahead: true})
	if s.bg.idleLayers.countAhead() > maxWarm {
		s.kick()
	}
	return nil
}

// viewable reads committed parent's record, for a view key: ok says parent
// is a ready committed snapshot and key is free, so the view's record can
// be written while the device activates; warm says parent has a warm
// device.
func (s *Snapshotter) viewable(ctx context.Context, key, parent string) (p storage.Snapshot, ok, warm bool, err error) {
	err = s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if p, err = tx.GetSnapshot(parent); err != nil {
			return nil
		}
		if _, err := tx.GetSnapshot(key); !errdefs.IsNotFound(err) {
			return nil
		}
		ws, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		ok = p.Kind == snapshots.KindCommitted && p.State == storage.StateReady
		warm = hasWarm(ws, parent)
		return nil
	})
	return p, ok, warm, err
}

// recordView records view key of parent, unless err (a failed read)
// already tells why not.
func (s *Snapshotter) recordView(ctx context.Context, key, parent string, labels map[string]string, err error) (snap storage.Snapshot, _ error) {
	if err != nil {
		return snap, err
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		p, err := tx.GetSnapshot(parent)
		if err != nil {
			return fmt.Errorf("parent %q: %w", parent, err)
		}
		snap, err = tx.CreateSnapshot(storage.Snapshot{
			Key: key, Kind: snapshots.KindView, Parent: parent, Labels: labels,
			State: storage.StateReady, Size: p.Size, FSType: p.FSType,
		})
		return err
	})
	return snap, err
}

// releaseLayer notes that committed parent lost a view. Its device stays
// active while views share it; once none does, it waits for the layer's
// next view like a warm device, and the worker deactivates it when it has
// waited warmIdle or more than maxWarm wait (reclaimIdle). So a Remove of
// a view costs one database transaction, and the next View of the layer
// none.
func (s *Snapshotter) releaseLayer(parent string) {
	s.bg.idleLayers.add(idleLayer{key: parent, released: time.Now()})
}

// reclaimLayers deactivates the devices of layers, picked from idleLayers,
// unless a view came back meanwhile. A device still open (a view mounted
// after its removal) stays; check reports it. A layer that fails is listed
// again, for the next round or Drain.
func (s *Snapshotter) reclaimLayers(ctx context.Context, layers []idleLayer) {
	for _, l := range layers {
		if err := s.deactivateLayer(ctx, l.key); err != nil {
			s.bg.idleLayers.restore(l)
			log.G(ctx).WithError(err).WithField("layer", l.key).Warn("the device of a layer without views stays active; will retry")
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

// idleLayers are the layers whose read-only device is active without
// views: their last view went, or a View activated it ahead. The worker
// deactivates them.
type idleLayers struct {
	mu     sync.Mutex
	layers map[string]idleLayer
}

// idleLayer is a layer whose device is active without views.
type idleLayer struct {
	key string
	// released is when it lost its last view or was activated ahead.
	released time.Time
	// ahead says a View activated it ahead and no view of it went since.
	ahead bool
}

func (l *idleLayers) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.layers)
}

// countAhead counts the layers activated ahead.
func (l *idleLayers) countAhead() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, x := range l.layers {
		if x.ahead {
			n++
		}
	}
	return n
}

func (l *idleLayers) add(x idleLayer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.layers == nil {
		l.layers = map[string]idleLayer{}
	}
	l.layers[x.key] = x
}

// restore lists x again, unless its layer was listed again meanwhile.
func (l *idleLayers) restore(x idleLayer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.layers[x.key]; !ok {
		l.layers[x.key] = x
	}
}

// pick removes and returns, oldest first, the layers pick chooses; it sees
// when each was released and how many were released after it.
func (l *idleLayers) pick(pick func(released time.Time, newer int) bool) []idleLayer {
	return l.pickAmong(func(idleLayer) bool { return true }, pick)
}

// pickAhead removes and returns the layers activated ahead beyond the
// newest maxWarm of them.
func (l *idleLayers) pickAhead() []idleLayer {
	return l.pickAmong(func(x idleLayer) bool { return x.ahead }, func(_ time.Time, newer int) bool { return newer >= maxWarm })
}

// pickAmong is pick, over only the layers for which among is true.
func (l *idleLayers) pickAmong(among func(idleLayer) bool, pick func(released time.Time, newer int) bool) []idleLayer {
	l.mu.Lock()
	defer l.mu.Unlock()
	var xs []idleLayer
	for _, x := range l.layers {
		if among(x) {
			xs = append(xs, x)
		}
	}
	slices.SortFunc(xs, func(a, b idleLayer) int { return a.released.Compare(b.released) })
	var out []idleLayer
	for i, x := range xs {
		if pick(x.released, len(xs)-1-i) {
			out = append(out, x)
			delete(l.layers, x.key)
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
