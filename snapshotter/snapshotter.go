// Package snapshotter implements containerd's snapshots.Snapshotter on thin
// devices of a device-mapper thin pool, with all state in one bbolt database
// (package storage) and the kernel reached through package dmsetup.
//
// Each snapshot is a thin device. A new layer or container is a create_snap
// of its parent's device (or of the base device, an empty filesystem made
// once). A commit gives the layer a fresh snapshot of the active device and
// keeps the active device as a warm device of the layer, ready for its next
// child (warm.go).
//
// # The journal
//
// Every pool mutation follows one protocol (poolstep.go): a write
// transaction records the intent in the journal (and reserves ids and
// keys), the kernel work runs with no transaction open, and a second
// transaction records the outcome and clears the entry. Recovery at startup
// finishes or rolls back what a crash interrupted (recover.go). A Commit's
// intent is written ahead, with the active snapshot's record: the id its
// device will get. Its outcome is written while the pool makes the device,
// and recovery finishes a commit cut short after that write (commit.go).
//
// # Files
//
// Calls: create.go (Prepare, View), view.go (views share their layer's
// device), commit.go, remove.go, update.go
// (labels and the max-size grow), share.go (layers shared between size
// classes), class.go (size classes), container.go (a CRI container's
// snapshot, found by its id and grown to its pod's disk size). Background
// work: worker.go and warm.go. Kernel side: pool.go (the dm client),
// poolstep.go, base.go, poolgrow.go (the embedded pool grows), fsgrow.go
// (a filesystem grows to its device), imagefs.go (the image filesystem
// mirror the kubelet reads, package imagefs). Start and stop: open.go,
// ownership.go, recover.go. Operators: status.go, devices.go, steps.go,
// check*.go and selfcheck.go (the snapshotter checks itself).
//
// # Concurrency
//
// Locks, outermost first. Code holding one may take only those after it:
//
//  1. checkMu: one check at a time (Check, CheckOnline, and the self-check
//     with its repairs): the pool has room for one metadata snapshot. It
//     is held for seconds (thin_ls) but never by a snapshot call.
//  2. keys: one lock per snapshot key. Prepare, View, Commit, Remove,
//     Update, GrowContainer and Mounts of the same key run one at a time
//     (Mounts waits for a grow); other keys run in parallel. A Prepare may
//     wait under its key lock for a warm device of its parent being made
//     ahead of it (warmAhead), and Prepare, View and Remove wait under it
//     while a Commit makes the device of their layer
//     (background.committing); neither of those takes a key lock. Then
//     layers: one lock per committed layer, taken by a View or a view's
//     Remove (holding the view's key lock) while it activates or
//     deactivates the read-only device the layer's views share, and by
//     the goroutine that activates a layer ahead of its view (no key
//     lock); a View holds it until its record is written.
//  3. grower.mu: one growth of the embedded pool at a time (a Prepare short
//     of space grows it, and so does the growth goroutine).
//  4. poolMu: the pool's metadata messages (create_thin, create_snap,
//     delete, set_transaction_id) one at a time, with the suspend and
//     resume around a snapshot of an active device; it also guards txid.
//     Check holds it while it takes the pool's metadata snapshot and reads
//     the database, so the two agree.
//  5. bbolt's writer lock, inside storage.DB.Update. The call that commits
//     a group of waiting Updates takes it for all of them (storage's group
//     commit), so callbacks take no lock and may run more than once.
//     Journal entries are written before poolMu is taken, so one call's
//     fsync overlaps another call's pool message. No goroutine holding poolMu writes the database
//     or waits for bbolt; a Commit's record is written by a goroutine of
//     its own while the Commit holds poolMu for its create_snap, so other
//     pool messages and checks see the record and the device together
//     (commitAtOnce). The self-check reads the database again under poolMu
//     before it releases a leaked id, so no create can take the id
//     meanwhile.
//
// Leaf locks, under which nothing else is taken: keyLocks.mu, the removals
// in flight (background.removing), the refill requests (refills.mu), the
// layers left without views (idleLayers.mu), the warm devices being made
// and the layers being activated ahead (aheads.mu, and pending.mu inside
// it), the layers being committed
// (pending.mu), the admin state (adminState.mu) and the mirror's last
// error (imageFS.mu).
//
// Outside poolMu on purpose: activating, removing, resizing and
// discarding one dm device (the kernel serializes calls on a device, and
// device names come from thin ids, so two calls never share one), status
// reads, and the embedded pool's table reload when it grows (pool messages
// do not depend on the pool's size, and holding poolMu through a growth
// would stall every call for its length).
//
// Goroutines: the worker (worker.go), for an embedded pool with
// max_data_size the growth watcher (poolgrow.go), with a CheckInterval
// the self-check (selfcheck.go), with ImageFSMirror the mirror's watcher
// (imagefs.go), the only caller of the mirror once New has set it up, one
// per warm device a View makes ahead of a Prepare (warmAhead), and one per
// layer a View of its parent activates ahead of its own view
// (activateAhead). New
// starts them; Close stops them and waits for them before it closes the
// database. A View writes its record in a goroutine of its own while it
// activates the layer's device, and a Commit while the pool makes the
// device; each waits for its goroutine. Work the worker or a self-check
// repair has begun is finished even when it is stopped, so no half-made
// device waits for the next start.
//
// The daemon's NRI plugin (cmd/thin-snapshotter/nri.go) calls
// FindContainer and GrowContainer from a goroutine per grow, which may
// outlive NRI's request, besides its registration loop; its mutex (the
// plugin's stopping flag) is a leaf. The daemon stops the plugin and waits
// for its grows before it closes the Snapshotter.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

const (
	dbFile  = "metadata.db"
	poolDir = "pool"
)

// Snapshotter stores snapshots as thin devices.
type Snapshotter struct {
	cfg  Config
	db   *storage.DB
	pool thinPool
	// recordedPool is the pool's name in the database (devicePool); set
	// before any device is named, read-only afterwards.
	recordedPool string
	// forCheck: opened by OpenForCheck, with no background work, so
	// Check may repair.
	forCheck bool

	// checkMu: one check at a time (see Concurrency).
	checkMu sync.Mutex
	// poolMu serializes the pool's metadata messages (see Concurrency);
	// txid is the pool's transaction id.
	poolMu sync.Mutex
	txid   uint64

	keys keyLocks
	// layers has one lock per layer whose device its views share
	// (view.go).
	layers keyLocks
	// bg is the background work (worker.go).
	bg background
	// autogrow grows the embedded pool (MaxDataSize); nil when it does not.
	autogrow *grower
	// admin serves Status, the step observer and the counters.
	admin adminState
	// imagefs is the image filesystem mirror (imagefs.go).
	imagefs imageFS

	// growFS makes the filesystem on dev fill its device, and format
	// makes the base filesystem; unit tests replace both.
	growFS func(ctx context.Context, dev, fsType string) error
	format func(ctx context.Context, dev string) error

	closeOnce sync.Once
	closeErr  error
	closers   []func() error
}

var _ snapshots.Snapshotter = (*Snapshotter)(nil)
var _ snapshots.Cleaner = (*Snapshotter)(nil)

// devicePool names the pool in its devices' names: the name the database
// recorded, so they keep their names when LVM moves the pool to its other
// dm name (poolNames); the pool's own name until one is recorded.
func (s *Snapshotter) devicePool() string {
	if s.recordedPool != "" {
		return s.recordedPool
	}
	return s.pool.Name()
}

// deviceName is the dm name of thin id: built from the pool and the id,
// never from a snapshot key.
func (s *Snapshotter) deviceName(id uint32) string {
	return dmsetup.DeviceName(s.devicePool(), id)
}

// Stat returns the info of a snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.db.View(ctx, func(tx *storage.Tx) error {
		info, err = tx.Stat(key)
		return err
	})
	return info, err
}

// Walk calls fn for every snapshot matching one of the filters.
// Snapshots of size classes are not listed.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, fs ...string) error {
	return s.walk(ctx, defaultSpace, fn, fs...)
}

// walk is Walk over the stored keys rename maps to a client's keys.
func (s *Snapshotter) walk(ctx context.Context, rename func(string) (string, bool), fn snapshots.WalkFunc, fs ...string) error {
	// Collect first: fn may be slow (a gRPC stream) and must not hold a
	// transaction open.
	var infos []snapshots.Info
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		return tx.WalkKeys(rename, func(info snapshots.Info) error {
			infos = append(infos, info)
			return nil
		}, fs...)
	}); err != nil {
		return err
	}
	for _, info := range infos {
		if err := fn(ctx, info); err != nil {
			return err
		}
	}
	return nil
}

// ready returns the record of key if clients may see it.
func (s *Snapshotter) ready(ctx context.Context, key string) (snap storage.Snapshot, err error) {
	err = s.db.View(ctx, func(tx *storage.Tx) error {
		snap, err = readyIn(tx, key)
		return err
	})
	return snap, err
}

// readyIn returns the record of key in tx if clients may see it.
func readyIn(tx *storage.Tx, key string) (storage.Snapshot, error) {
	snap, err := tx.GetSnapshot(key)
	if err != nil {
		return snap, err
	}
	if snap.State != storage.StateReady {
		return snap, fmt.Errorf("snapshot %q is %s: %w", key, snap.State, errdefs.ErrNotFound)
	}
	return snap, nil
}

// Usage of an active snapshot is what its device maps now; of a committed
// one, what was recorded at commit.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	snap, err := s.ready(ctx, key)
	if err != nil {
		return snapshots.Usage{}, err
	}
	if snap.Kind == snapshots.KindCommitted {
		return snap.Usage, nil
	}
	if sharesDevice(snap) {
		return snapshots.Usage{}, nil // read-only: nothing of its own
	}
	st, err := s.pool.ThinStatus(s.deviceName(snap.DeviceID))
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %q: %w", key, err)
	}
	return ownUsage(st.MappedSectors, snap.Shared), nil
}

// ownUsage is what a device maps beyond what it shared with its origin when
// it was made: containerd's Usage excludes the parents. Shared blocks the
// snapshot rewrote are not counted; telling them apart needs the pool's
// metadata (thin_ls), too slow for a call CRI makes every 10 s.
func ownUsage(mapped dmsetup.Sectors, shared uint64) snapshots.Usage {
	if uint64(mapped) < shared {
		return snapshots.Usage{}
	}
	return snapshots.Usage{Size: int64((mapped - dmsetup.Sectors(shared)).Bytes())}
}

// Mounts returns the mount of an active snapshot or a view. It waits for a
// call on key in progress, so that nobody mounts a filesystem while it
// grows (GrowContainer may go on after the NRI hook answered).
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	unlock := s.keys.lock(key)
	defer unlock()
	var (
		snap storage.Snapshot
		dev  uint32
	)
	err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if snap, err = readyIn(tx, key); err != nil {
			return err
		}
		dev, err = s.deviceOf(tx, snap)
		return err
	})
	if err != nil {
		return nil, err
	}
	if snap.Kind == snapshots.KindCommitted {
		return nil, fmt.Errorf("snapshot %q is committed and has no mounts: %w", key, errdefs.ErrFailedPrecondition)
	}
	return s.mounts(snap, dev), nil
}

// mounts are the mounts of snap, on the device of thin id dev (its own, or
// its layer's for a view that shares it).
func (s *Snapshotter) mounts(snap storage.Snapshot, dev uint32) []mount.Mount {
	var opts []string
	if snap.Kind == snapshots.KindView {
		opts = append(opts, "ro")
	}
	if snap.FSType == FSTypeXFS {
		// Every device is a snapshot of one base filesystem: same UUID.
		opts = append(opts, "nouuid")
	}
	if snap.FSType == FSTypeExt4 {
		// Unwritten thin blocks read as zeros: the kernel's background
		// zeroing of the inode tables a grow added would only take pool
		// space (1.5% of the added size).
		opts = append(opts, "noinit_itable")
	}
	if s.cfg.Discard && snap.Kind != snapshots.KindView {
		opts = append(opts, "discard")
	}
	opts = append(opts, s.cfg.MountOptions...)
	return []mount.Mount{{
		Type:    snap.FSType,
		Source:  s.pool.DevicePath(s.deviceName(dev)),
		Options: opts,
	}}
}

// Close stops the background work, deletes the warm devices, finishes
// pending removals and closes the database; other devices stay as they
// are, for the next start.
func (s *Snapshotter) Close() error {
	s.closeOnce.Do(func() {
		if !s.forCheck {
			s.stopBackground()
			// What is busy stays journaled for the next start.
			if err := s.Drain(context.Background()); err != nil {
				log.L.WithError(err).Warn("closing: devices left for the next start")
			}
			// No commit is under way: the next start needs no sweep of
			// the ids reserved for commits.
			if err := s.db.Update(context.Background(), func(tx *storage.Tx) error { return tx.SetCleanStop(true) }); err != nil {
				log.L.WithError(err).Warn("closing: the next start looks for devices of interrupted commits")
			}
		}
		var errs []error
		if s.closers == nil {
			errs = append(errs, s.db.Close())
		}
		for _, v := range slices.Backward(s.closers) {
			errs = append(errs, v())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}
