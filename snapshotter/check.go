package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolInspector is what Check needs from the kernel beyond thinPool. dmPool
// implements it; the fake pool of the unit tests too.
type poolInspector interface {
	// ReserveMetadata takes a snapshot of the pool metadata, whose thin
	// ids can be listed while the pool goes on.
	ReserveMetadata() (metadataSnapshot, error)
	// ReleaseMetadata drops the pool's metadata snapshot, whoever took it.
	ReleaseMetadata() error
	// ThinTarget returns the thin target parameters and length in sectors
	// of dm device name; ErrMalformed-wrapped when it is not one thin
	// target.
	ThinTarget(name string) (dmsetup.ThinParams, dmsetup.Sectors, error)
	// PoolDevice is the pool as thin tables name it (major:minor).
	PoolDevice() string
}

// Check compares the database with the pool's real contents and, with
// opts.Repair, fixes what is safe to fix. The error is for a check that
// could not run; problems found are in the report (see Report for its JSON
// form and FindingKind for the kinds).
//
// Sources compared: the thin ids in the pool metadata (read from a metadata
// snapshot with thin_ls, or thin_dump, of thin-provisioning-tools), the dm
// devices named <pool>-snap-<id> with their tables, the snapshot records,
// the id table, the journal and the two transaction ids.
//
// Repair refuses to touch the pool when the pool may not be this database's
// by the rule the daemon applies at startup (the transaction ids differ by
// more than the pending journal entries explain, the recorded pool name
// differs, or none is recorded) or when the pool is failed, read-only or
// needs thin_check: then every finding stays for a person. Otherwise, in
// this order:
//   - pending journal entries: the startup recovery finishes or rolls back
//     each one, which also aligns the database's transaction id;
//   - stale and wrong dm devices are removed unless open (a wrong one is
//     then activated with the right table);
//   - records left creating or removing are removed with their devices;
//   - orphans are recorded foreign: the database cannot prove it made
//     them, so they are kept;
//   - leaked ids are released;
//   - with opts.ReleaseForeign, foreign ids (thin ids the pool had that
//     the database did not make, orphans included) are freed: a device
//     still in the pool is deleted first, so only set it when those
//     devices are known to be unneeded;
//   - missing devices of active snapshots and views are activated;
//   - a missing base device is made again.
//
// Ghosts (a record whose thin device is gone: its data is lost) are only
// reported, unless opts.RemoveGhosts is set: then their records are removed
// (leaves first; a ghost with live children stays). id_conflict and
// pool_unhealthy always need a person.
//
// Repair needs a snapshotter from OpenForCheck: on a serving one it would
// race with calls in flight. A read-only Check of a serving snapshotter
// works but may report operations in flight as pending journal entries.
func (s *Snapshotter) Check(ctx context.Context, opts CheckOptions) (*Report, error) {
	if opts.Repair && !s.forCheck {
		return nil, fmt.Errorf("repair needs a snapshotter opened with OpenForCheck (the daemon stopped): %w", errdefs.ErrFailedPrecondition)
	}
	s.checkMu.Lock()
	defer s.checkMu.Unlock()
	r, st, err := s.checkOnce(ctx)
	if err != nil || !opts.Repair {
		return r, err
	}
	r.Repair = true
	s.repair(ctx, st, r.Findings, opts)
	st, err = s.gather(ctx)
	if err != nil {
		return r, fmt.Errorf("checking again after repair: %w", err)
	}
	r.PoolTransactionID, r.DBTransactionID = st.poolTx, st.dbTx
	r.BaseDeviceID, r.PoolDevices, r.Records = st.pi.BaseDeviceID, st.poolIDs(), len(st.records)
	r.Remaining = s.compare(st)
	r.Clean = len(r.Remaining) == 0
	return r, nil
}

// checkOnce gathers the state and compares it: a report without repair,
// and the state it saw.
func (s *Snapshotter) checkOnce(ctx context.Context) (*Report, *checkState, error) {
	st, err := s.gather(ctx)
	if err != nil {
		return nil, nil, s.blameFault(err)
	}
	r := &Report{
		Root:              s.cfg.Root,
		Pool:              s.pool.Name(),
		PoolTransactionID: st.poolTx,
		DBTransactionID:   st.dbTx,
		BaseDeviceID:      st.pi.BaseDeviceID,
		PoolDevices:       st.poolIDs(),
		Records:           len(st.records),
		Findings:          s.compare(st),
	}
	r.Remaining = r.Findings
	r.Clean = len(r.Remaining) == 0
	return r, st, nil
}

// checkState is everything Check compares, as of one moment with no pool
// step running (the pool's thin ids from a metadata snapshot taken then).
type checkState struct {
	status  dmsetup.PoolStatus
	poolTx  uint64
	dbTx    uint64
	pi      storage.PoolInfo // zero when the database has none
	inPool  map[uint32]bool
	records []storage.Snapshot
	ids     map[uint32]string // allocated id → owner
	foreign map[uint32]bool   // ids marked foreign
	journal []storage.Entry
	warm    []storage.Warm
	devices map[string]devState // dm devices named <pool>-snap-*
	// poolLocked is how long gathering held poolMu: what a snapshot call
	// may wait for a check (the benchmark reports it).
	poolLocked time.Duration
}

func newCheckState() *checkState {
	return &checkState{inPool: map[uint32]bool{}, ids: map[uint32]string{}, foreign: map[uint32]bool{}, devices: map[string]devState{}}
}

type devState struct {
	info    dmsetup.Info
	params  dmsetup.ThinParams
	sectors dmsetup.Sectors
	err     error // reading the table
}

func (st *checkState) poolIDs() []uint32 {
	out := make([]uint32, 0, len(st.inPool))
	for id := range st.inPool {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

func (s *Snapshotter) inspector() (poolInspector, error) {
	in, ok := s.pool.(poolInspector)
	if !ok {
		return nil, fmt.Errorf("pool %s cannot list its metadata: %w", s.pool.Name(), errdefs.ErrNotImplemented)
	}
	return in, nil
}

func (s *Snapshotter) gather(ctx context.Context) (*checkState, error) {
	in, err := s.inspector()
	if err != nil {
		return nil, err
	}
	st := newCheckState()
	// No pool step runs while the metadata snapshot is taken and the
	// database and the devices are read, so they agree (every step
	// journals before it touches the pool). thin_ls reads the snapshot
	// afterwards, while pool steps go on.
	meta, err := s.gatherLocked(ctx, in, st)
	if err != nil {
		return nil, err
	}
	ids, err := meta.ThinIDs(ctx)
	if err = errors.Join(err, meta.Release()); err != nil {
		return nil, err
	}
	for _, id := range ids {
		st.inPool[id] = true
	}
	return st, nil
}

// gatherLocked fills st but for the pool's thin ids, under poolMu, and
// returns the metadata snapshot taken with it.
func (s *Snapshotter) gatherLocked(ctx context.Context, in poolInspector, st *checkState) (meta metadataSnapshot, err error) {
	s.poolMu.Lock()
	locked := time.Now()
	defer func() {
		st.poolLocked = time.Since(locked)
		s.poolMu.Unlock()
	}()
	if st.status, err = s.pool.Status(); err != nil {
		return nil, fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	st.poolTx = st.status.TransactionID
	m, err := s.reserveMetadata(ctx, in)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, m.Release())
		}
	}()
	if err := s.db.View(ctx, func(tx *storage.Tx) error { return st.readDB(tx) }); err != nil {
		return nil, err
	}
	devs, err := s.pool.List()
	if err != nil {
		return nil, fmt.Errorf("listing dm devices: %w", err)
	}
	for _, d := range devs {
		if !strings.HasPrefix(d.Name, dmsetup.DeviceNamePrefix(s.devicePool())) {
			continue
		}
		var ds devState
		if ds.info, err = s.pool.Info(d.Name); err != nil {
			if dmsetup.IsNotFound(err) {
				continue // removed meanwhile
			}
			return nil, fmt.Errorf("dm device %s: %w", d.Name, err)
		}
		if ds.info.LiveTable {
			ds.params, ds.sectors, ds.err = in.ThinTarget(d.Name)
		}
		st.devices[d.Name] = ds
	}
	return m, nil
}

// reserveMetadata takes the pool's metadata snapshot. Checks are its only
// takers (the pool is dedicated), one at a time per database (checkMu, and
// the database's lock keeps a second process out), so one held already
// was left by a check a crash interrupted: it is released first. Called
// under checkMu.
func (s *Snapshotter) reserveMetadata(ctx context.Context, in poolInspector) (metadataSnapshot, error) {
	m, err := in.ReserveMetadata()
	if err == nil || !dmsetup.IsBusy(err) {
		return m, err
	}
	if rerr := in.ReleaseMetadata(); rerr != nil {
		return nil, errors.Join(err, rerr)
	}
	log.G(ctx).WithField("pool", s.pool.Name()).Warn("released a metadata snapshot of the pool that an interrupted check left")
	return in.ReserveMetadata()
}

// readDB fills in what the database says: the pool it owns, its
// transaction id, the journal, the warm devices, the foreign ids, the id
// table and the records.
func (st *checkState) readDB(tx *storage.Tx) error {
	var err error
	if st.pi, err = tx.PoolInfo(); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	if st.dbTx, err = tx.TransactionID(); err != nil {
		return err
	}
	if st.journal, err = tx.Journal(); err != nil {
		return err
	}
	if st.warm, err = tx.WarmDevices(); err != nil {
		return err
	}
	foreign, err := tx.ForeignIDs()
	if err != nil {
		return err
	}
	for _, id := range foreign {
		st.foreign[id] = true
	}
	if err := tx.WalkIDs(func(id uint32, owner string) error {
		st.ids[id] = owner
		return nil
	}); err != nil {
		return err
	}
	return tx.WalkSnapshots(func(sn storage.Snapshot) error {
		st.records = append(st.records, sn)
		return nil
	})
}

func openNote(info dmsetup.Info) string {
	if info.OpenCount > 0 {
		return fmt.Sprintf(" (open %d times: unmount it first)", info.OpenCount)
	}
	return ""
}

// poolIsOurs tells whether the pool is the one this database manages, by
// the rule the daemon applies at startup, and why not.
func (s *Snapshotter) poolIsOurs(st *checkState) (bool, string) {
	isNew, mismatch := poolOwnership(st.pi, st.dbTx, len(st.journal), poolNames(s.pool), st.poolTx)
	switch {
	case isNew:
		return false, "the database has no pool recorded (the daemon never finished starting on it)"
	case mismatch != "":
		return false, mismatch + " (the daemon's allow_adopt takes it over)"
	}
	return true, ""
}

// idOfName is the thin id in the name of one of the pool's devices; id 0
// is never handed out.
func (s *Snapshotter) idOfName(name string) (uint32, bool) {
	id, ok := dmsetup.ParseDeviceName(s.devicePool(), name)
	return id, ok && id != 0
}

func sortedKeys[K string | uint32, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
