// Package snapshotter implements containerd's snapshots.Snapshotter on thin
// devices of a device-mapper thin pool, with all state in one bbolt database
// (package storage) and the kernel reached through package dmsetup.
//
// Every pool mutation follows one protocol: a write transaction records the
// intent in the journal (and reserves ids and keys), the kernel work runs
// with no transaction open, and a second transaction records the outcome and
// clears the entry. Recovery at startup finishes or rolls back what a crash
// interrupted.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

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
	pool Pool
	// recordedPool is the pool's name in the database (devicePool); set
	// before any device is named, read-only afterwards.
	recordedPool string

	// poolMu serializes pool metadata messages (and, while the pool is
	// set up, the transaction id that follows them: poolStep); txid is
	// the pool's current one.
	poolMu sync.Mutex
	txid   uint64

	keys keyLocks
	// calls tracks Prepare, View, Commit and Remove, which background
	// work gives way to (pace.go).
	calls activity

	// admin serves Status and the step observer (status.go).
	admin adminState

	// sharedLayers counts unpacks saved by layer sharing.
	sharedLayers atomic.Uint64

	// grow makes the filesystem on dev fill its device; replaced in
	// unit tests.
	grow func(ctx context.Context, dev, fsType string) error

	// format makes the base filesystem; replaced in unit tests.
	format func(ctx context.Context, dev string) error

	// Removals in flight by journal sequence, so the worker and Remove
	// never finish the same entry twice.
	delMu    sync.Mutex
	deleting map[uint64]bool

	// Committed snapshots whose next child should find a warm device:
	// a Prepare on them found none, or took one and they had children
	// before (warm.go). children counts the Prepares on each.
	refillMu  sync.Mutex
	refill    map[string]bool
	refilling bool
	children  map[string]int

	// autogrow grows the embedded pool (MaxDataSize); nil when it does not.
	autogrow *grower
	// bg counts background goroutines besides the worker.
	bg sync.WaitGroup

	wake      chan struct{}
	stop      context.CancelFunc
	done      chan struct{}
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
		snap, err = tx.GetSnapshot(key)
		return err
	})
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

// Mounts returns the mount of an active snapshot or a view.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	snap, err := s.ready(ctx, key)
	if err != nil {
		return nil, err
	}
	if snap.Kind == snapshots.KindCommitted {
		return nil, fmt.Errorf("snapshot %q is committed and has no mounts: %w", key, errdefs.ErrFailedPrecondition)
	}
	return s.mounts(snap), nil
}

func (s *Snapshotter) mounts(snap storage.Snapshot) []mount.Mount {
	var opts []string
	if snap.Kind == snapshots.KindView {
		opts = append(opts, "ro")
	}
	if snap.FSType == "xfs" {
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
		Source:  s.pool.DevicePath(s.deviceName(snap.DeviceID)),
		Options: opts,
	}}
}

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

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	defer s.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()
	if err := s.checkPoolHealth(ctx); err != nil {
		return nil, err
	}
	if chain := base.Labels[snapshots.LabelSnapshotRef]; chain != "" && kind == snapshots.KindActive {
		if err := s.shareLayer(ctx, key, parent, chain, base.Labels); !errors.Is(err, errNoLayer) {
			return nil, err
		}
	}
	if kind == snapshots.KindActive && parent != "" {
		snap, ok, err := s.takeWarm(ctx, key, parent, base.Labels)
		if err != nil {
			return nil, err
		}
		if ok {
			s.tookWarm(parent)
			return s.mounts(snap), nil
		}
	}

	r, journal, err := s.createStep(ctx, kind, key, parent, base.Labels)
	if journal != nil {
		return nil, journal
	}
	snap, entry, grow := r.snap, r.entry, r.grow

	if err == nil {
		name := s.deviceName(snap.DeviceID)
		err = s.timed(StepActivate, func() error {
			return s.pool.Activate(name, snap.DeviceID, dmsetup.BytesToSectors(snap.Size), kind == snapshots.KindView)
		})
		if err == nil && grow {
			// The filesystem is its origin's size: it fills the
			// device before anyone mounts it.
			err = s.timed(StepGrow, func() error { return s.grow(ctx, s.pool.DevicePath(name), snap.FSType) })
			if err != nil {
				err = errors.Join(err, s.pool.Deactivate(ctx, name))
			}
		}
		if err != nil {
			s.poolMu.Lock()
			err = errors.Join(err, ignoreNoData(s.pool.DeleteThin(entry.DeviceID)))
			s.poolMu.Unlock()
		}
	}
	if err != nil {
		if rerr := s.rollbackCreate(ctx, entry, false); rerr != nil {
			// The journal keeps the entry; recovery finishes it.
			log.G(ctx).WithError(rerr).WithField("key", key).Error("rolling back a failed prepare")
		}
		return nil, fmt.Errorf("create thin device for %q: %w", key, err)
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
		return tx.FinishJournal(entry.Seq)
	})
	if err != nil {
		return nil, err
	}
	snap.State = storage.StateReady
	if kind == snapshots.KindActive && parent != "" {
		// More children may follow (containers of one image).
		s.countChild(parent)
		s.wantWarm(parent)
	}
	return s.mounts(snap), nil
}

type createResult struct {
	snap  storage.Snapshot
	entry storage.Entry
	grow  bool // the device is larger than its origin's filesystem
}

// createStep is the pool step of create: it journals a new record and thin
// device of parent (or of the base) and makes the device's snapshot.
func (s *Snapshotter) createStep(ctx context.Context, kind snapshots.Kind, key, parent string, labels map[string]string) (r createResult, journal, err error) {
	r.entry, journal, err = s.snapStep(ctx, func(tx *storage.Tx) (storage.Entry, error) {
		pi, err := tx.PoolInfo()
		if err != nil {
			return storage.Entry{}, err
		}
		origin, size, fsType := pi.BaseDeviceID, pi.BaseSize, pi.BaseFSType
		if parent != "" {
			p, err := tx.GetSnapshot(parent)
			if err != nil {
				return storage.Entry{}, fmt.Errorf("parent %q: %w", parent, err)
			}
			origin, size, fsType = p.DeviceID, p.Size, p.FSType
		}
		r.grow = false
		if kind == snapshots.KindActive {
			// Views are read-only: their filesystem cannot grow.
			want, err := requestedSize(labels, size)
			if err != nil {
				return storage.Entry{}, err
			}
			if r.grow = want > size; r.grow {
				size = want
			}
		}
		id, err := tx.AllocateID()
		if err != nil {
			return storage.Entry{}, err
		}
		r.snap, err = tx.CreateSnapshot(storage.Snapshot{
			Key: key, Kind: kind, Parent: parent, Labels: labels,
			State: storage.StateCreating, DeviceID: id, Size: size, FSType: fsType,
		})
		return storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: origin, Key: key}, err
	})
	return r, journal, err
}

// snapLocked snapshots origin into id; an active origin is suspended around
// it so its in-flight writes land in the snapshot. Called with poolMu held.
func (s *Snapshotter) snapLocked(id, origin uint32) error {
	name := s.deviceName(origin)
	info, err := s.pool.Info(name)
	active := err == nil && info.LiveTable && !info.Suspended
	if active {
		if err := s.pool.Suspend(name); err != nil {
			return err
		}
	}
	err = s.timed(StepCreateSnap, func() error { return s.pool.CreateSnap(id, origin) })
	if active {
		err = errors.Join(err, s.pool.Resume(name))
	}
	return err
}

// rollbackCreate undoes the records of a failed create after its device was
// deleted (or never made).
func (s *Snapshotter) rollbackCreate(ctx context.Context, e storage.Entry, txSet bool) error {
	return s.db.Update(ctx, func(tx *storage.Tx) error {
		if e.Key != "" { // the base device has no record
			if snap, err := tx.GetSnapshot(e.Key); err == nil && snap.DeviceID == e.DeviceID && snap.State == storage.StateCreating {
				if _, err := tx.RemoveSnapshot(e.Key); err != nil {
					return err
				}
			} else if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
		}
		if err := tx.ReleaseID(e.DeviceID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if txSet {
			if err := s.raiseTxID(tx, e.TxID); err != nil {
				return err
			}
		}
		return tx.FinishJournal(e.Seq)
	})
}

// Commit turns active snapshot key into committed snapshot name: the
// committed snapshot's device is a new snapshot of the active's, and the
// active's device, still active, waits for name's next child (warm.go).
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if err := checkDefaultKey(name); err != nil {
		return err
	}
	return s.commit(ctx, name, key, opts...)
}

func (s *Snapshotter) commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	defer s.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()
	return s.commitSnap(ctx, name, key, opts)
}

// Remove deletes a snapshot. The record goes at once; the device is deleted
// now, or by the worker when async_remove is set or the device is briefly
// busy.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	defer s.calls.begin()()
	unlock := s.keys.lock(key)
	defer unlock()

	snap, err := s.ready(ctx, key)
	if err != nil {
		return err
	}
	if snap.Kind != snapshots.KindCommitted {
		// A mounted snapshot is containerd's to unmount first; refusing
		// now keeps the record instead of leaving a busy device behind.
		if info, err := s.pool.Info(s.deviceName(snap.DeviceID)); err == nil && info.OpenCount > 0 {
			return fmt.Errorf("snapshot %q: device %s is open (mounted?): %w", key, s.deviceName(snap.DeviceID), errdefs.ErrFailedPrecondition)
		}
	}
	var dels []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		removed, err := tx.RemoveSnapshot(key)
		if err != nil {
			return err
		}
		// Its warm devices hold its content: they go with it, and
		// first, so its own discard finds their blocks no longer shared
		// and passes them on to the pool's storage.
		if dels, err = warmToDelete(tx, func(e storage.Entry, _ int) bool { return e.Key == key }); err != nil {
			return err
		}
		entry := storage.Entry{Op: storage.OpDelete, DeviceID: removed.DeviceID, Key: key, Size: removed.Size}
		if removed.Kind == snapshots.KindView && removed.Parent != "" {
			// Unless its filesystem was grown to a larger size (writes
			// of its own), it has been read-only since its snapshot:
			// its parent holds all its blocks.
			p, err := tx.GetSnapshot(removed.Parent)
			if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			if err == nil && p.Size == removed.Size {
				entry.OriginID = p.DeviceID
			}
		}
		if entry.Seq, err = tx.AddJournal(entry); err != nil {
			return err
		}
		dels = append(dels, entry)
		return nil
	})
	if err != nil {
		return err
	}
	if s.cfg.AsyncRemove {
		s.kick()
		return nil
	}
	if err := s.finishDeletes(ctx, dels); err != nil {
		// The removal is journaled: the worker retries it.
		log.G(ctx).WithError(err).WithField("key", key).Warn("device deletion deferred")
		s.kick()
	}
	return nil
}

// Close stops the worker, deletes the warm devices and finishes pending
// removals, and closes the database; other devices stay as they are.
func (s *Snapshotter) Close() error {
	s.closeOnce.Do(func() {
		if s.stop != nil {
			s.stop()
			<-s.done
			s.bg.Wait()
			// Leave no warm device nor pending removal behind a clean
			// stop; what is busy stays journaled for the next start.
			if err := s.Drain(context.Background()); err != nil {
				log.L.WithError(err).Warn("closing: devices left for the next start")
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

// ignoreNoData treats deleting a thin id the pool does not have as done.
func ignoreNoData(err error) error {
	if err != nil && dmsetup.IsNotFound(err) {
		return nil
	}
	return err
}
