package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolInspector is what Check needs from the kernel beyond Pool. dmPool
// implements it; the fake pool of the unit tests too.
type poolInspector interface {
	// ReserveMetadata takes a snapshot of the pool metadata, whose thin
	// ids can be listed while the pool goes on.
	ReserveMetadata() (metadataSnapshot, error)
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
//   - orphans are deleted from the pool, journaled like any removal;
//   - leaked ids are released;
//   - with opts.ReleaseForeign, foreign ids (thin ids the pool already had
//     when a create tried them) are freed: a device still in the pool is
//     deleted first, so only set it when those devices are known to be
//     unneeded;
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
	if opts.Repair && s.stop != nil {
		return nil, fmt.Errorf("repair needs a snapshotter opened with OpenForCheck (the daemon stopped): %w", errdefs.ErrFailedPrecondition)
	}
	st, err := s.gather(ctx)
	if err != nil {
		return nil, err
	}
	r := &Report{
		Root:              s.cfg.Root,
		Pool:              s.pool.Name(),
		Repair:            opts.Repair,
		PoolTransactionID: st.poolTx,
		DBTransactionID:   st.dbTx,
		BaseDeviceID:      st.pi.BaseDeviceID,
		PoolDevices:       st.poolIDs(),
		Records:           len(st.records),
		Findings:          s.compare(st),
	}
	if !opts.Repair {
		r.Remaining = r.Findings
		r.Clean = len(r.Remaining) == 0
		return r, nil
	}
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
	devices map[string]devState // dm devices named <pool>-snap-*
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
	st := &checkState{inPool: map[uint32]bool{}, ids: map[uint32]string{}, foreign: map[uint32]bool{}, devices: map[string]devState{}}
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
	defer s.poolMu.Unlock()
	if st.status, err = s.pool.Status(); err != nil {
		return nil, fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	st.poolTx = st.status.TransactionID
	m, err := in.ReserveMetadata()
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, m.Release())
		}
	}()
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
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
	}); err != nil {
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
		ds.params, ds.sectors, ds.err = in.ThinTarget(d.Name)
		st.devices[d.Name] = ds
	}
	return m, nil
}

// compare turns the state into findings, in a stable order.
func (s *Snapshotter) compare(st *checkState) []Finding {
	out := []Finding{}
	add := func(f Finding) { out = append(out, f) }
	poolDev := ""
	if in, err := s.inspector(); err == nil {
		poolDev = in.PoolDevice()
	}

	if err := poolHealth(s.pool.Name(), st.status, -1, -1); err != nil && !errdefs.IsResourceExhausted(err) {
		add(Finding{Kind: FindingPoolUnhealthy, Message: err.Error()})
	}
	if ok, why := s.poolIsOurs(st); !ok || st.poolTx != st.dbTx {
		f := Finding{Kind: FindingTxIDMismatch, Repairable: ok,
			Message: fmt.Sprintf("pool transaction id %d, database %d", st.poolTx, st.dbTx)}
		if why != "" {
			f.Message += ": " + why
		} else {
			f.Message += fmt.Sprintf(" (explained by %d pending journal entries)", len(st.journal))
		}
		add(f)
	}

	// Ids the journal explains are in flight: not orphans, leaks or ghosts.
	journaled := map[uint32]bool{}
	journalKeys := map[string]bool{}
	for _, e := range st.journal {
		journaled[e.DeviceID] = true
		if e.Op == storage.OpWarm {
			// A device made ahead (Key is its parent), accounted
			// for; the daemon's start deletes what a crash left.
			continue
		}
		if e.Key != "" {
			journalKeys[e.Key] = true
		}
		f := Finding{Kind: FindingPendingJournal, DeviceID: e.DeviceID, Key: e.Key, Repairable: true, seq: e.Seq,
			Message: fmt.Sprintf("interrupted %s of thin device %d (journal entry %d, %s)", e.Op, e.DeviceID, e.Seq, e.Created.UTC().Format(time.RFC3339))}
		if e.Name != "" {
			f.Message += fmt.Sprintf(" as %q", e.Name)
		}
		add(f)
	}

	base := st.pi.BaseDeviceID
	if base != 0 && !st.inPool[base] && !journaled[base] {
		add(Finding{Kind: FindingBaseMissing, DeviceID: base, Repairable: true,
			Message: fmt.Sprintf("base device %d is not in the pool", base)})
	}

	owned := map[uint32]string{} // id → key of its record
	// want: dm devices that must exist, by name.
	want := map[string]storage.Snapshot{}
	settled := map[string]bool{} // devices another finding's repair removes
	for _, sn := range st.records {
		name := s.deviceName(sn.DeviceID)
		if prev, dup := owned[sn.DeviceID]; dup {
			add(Finding{Kind: FindingIDConflict, DeviceID: sn.DeviceID, Key: sn.Key,
				Message: fmt.Sprintf("records %q and %q share thin device %d", prev, sn.Key, sn.DeviceID)})
			continue
		}
		owned[sn.DeviceID] = sn.Key
		if owner, ok := st.ids[sn.DeviceID]; !ok || owner != sn.Key {
			msg := fmt.Sprintf("thin device %d of %q is not allocated in the id table (it could be handed out twice)", sn.DeviceID, sn.Key)
			if ok {
				msg = fmt.Sprintf("thin device %d of %q is allocated to %q in the id table", sn.DeviceID, sn.Key, owner)
			}
			add(Finding{Kind: FindingIDConflict, DeviceID: sn.DeviceID, Key: sn.Key, Message: msg})
		}
		if journalKeys[sn.Key] || journaled[sn.DeviceID] {
			continue
		}
		if sn.State != storage.StateReady {
			settled[name] = true // its removal takes the device too
			add(Finding{Kind: FindingNotReady, DeviceID: sn.DeviceID, Key: sn.Key, Device: name, Repairable: true,
				Message: fmt.Sprintf("record %q is %s with no operation pending", sn.Key, sn.State)})
			continue
		}
		if !st.inPool[sn.DeviceID] {
			add(Finding{Kind: FindingGhost, DeviceID: sn.DeviceID, Key: sn.Key, Device: name,
				Message: fmt.Sprintf("%s snapshot %q: thin device %d is not in the pool (its data is lost)", sn.Kind, sn.Key, sn.DeviceID)})
			continue
		}
		if sn.Kind != snapshots.KindCommitted {
			want[name] = sn
		}
	}

	for _, id := range sortedKeys(st.foreign) {
		f := Finding{Kind: FindingForeign, DeviceID: id, inPool: st.inPool[id]}
		if f.inPool {
			f.Message = fmt.Sprintf("thin id %d was already in the pool when a create tried it: a device that is not ours, kept and never used; "+
				"--repair --release-foreign deletes it from the pool and frees the id", id)
		} else {
			f.Message = fmt.Sprintf("thin id %d is marked foreign but is no longer in the pool; --repair --release-foreign frees the id", id)
		}
		add(f)
	}

	for _, id := range st.poolIDs() {
		if _, ok := owned[id]; ok || id == base || journaled[id] || st.foreign[id] {
			continue
		}
		if owner := st.ids[id]; owner != "" {
			// Deleting it would leave an id no release can free.
			add(Finding{Kind: FindingIDConflict, DeviceID: id, Key: owner,
				Message: fmt.Sprintf("thin device %d is in the pool and allocated to %q, which has no record", id, owner)})
			continue
		}
		add(Finding{Kind: FindingOrphan, DeviceID: id, Device: s.deviceName(id), Repairable: true,
			Message: fmt.Sprintf("thin device %d is in the pool but in no record, journal entry or the base", id)})
	}
	for _, id := range sortedKeys(st.ids) {
		owner := st.ids[id]
		if _, ok := owned[id]; ok || id == base || journaled[id] || st.inPool[id] || st.foreign[id] {
			continue
		}
		if owner != "" {
			add(Finding{Kind: FindingIDConflict, DeviceID: id, Key: owner,
				Message: fmt.Sprintf("id %d is allocated to %q, which has no record", id, owner)})
			continue
		}
		add(Finding{Kind: FindingLeakedID, DeviceID: id, Repairable: true,
			Message: fmt.Sprintf("id %d is allocated but in no record, journal entry or the pool", id)})
	}

	for _, name := range sortedKeys(st.devices) {
		d := st.devices[name]
		id, numbered := s.idOfName(name)
		if (numbered && journaled[id]) || settled[name] {
			continue
		}
		sn, needed := want[name]
		if !needed {
			why := "no record has thin device " + strings.TrimPrefix(name, dmsetup.DeviceNamePrefix(s.devicePool()))
			if k, ok := owned[id]; ok && numbered {
				why = fmt.Sprintf("%q is not an active snapshot or view", k)
			} else if numbered && id == base {
				why = "the base device is only active while it is made"
			}
			add(Finding{Kind: FindingStaleDevice, DeviceID: id, Device: name, Repairable: d.info.OpenCount == 0,
				Message: fmt.Sprintf("dm device %s is active but %s%s", name, why, openNote(d.info))})
			continue
		}
		var wrong []string
		switch {
		case d.err != nil:
			wrong = append(wrong, d.err.Error())
		default:
			if d.params.ID != sn.DeviceID {
				wrong = append(wrong, fmt.Sprintf("maps thin id %d", d.params.ID))
			}
			if poolDev != "" && d.params.PoolDev != poolDev {
				wrong = append(wrong, fmt.Sprintf("maps pool %s, not %s", d.params.PoolDev, poolDev))
			}
			if d.params.ExternalOrigin != "" {
				wrong = append(wrong, "has external origin "+d.params.ExternalOrigin)
			}
			if want := dmsetup.BytesToSectors(sn.Size); d.sectors != want {
				wrong = append(wrong, fmt.Sprintf("is %d sectors, not %d", d.sectors, want))
			}
		}
		if view := sn.Kind == snapshots.KindView; d.info.ReadOnly != view {
			wrong = append(wrong, fmt.Sprintf("read-only is %v for a %s snapshot", d.info.ReadOnly, sn.Kind))
		}
		if len(wrong) > 0 {
			add(Finding{Kind: FindingWrongDevice, DeviceID: sn.DeviceID, Device: name, Key: sn.Key, Repairable: d.info.OpenCount == 0,
				Message: fmt.Sprintf("dm device %s of %q %s%s", name, sn.Key, strings.Join(wrong, ", "), openNote(d.info))})
		}
	}
	for _, name := range sortedKeys(want) {
		if _, ok := st.devices[name]; ok {
			continue
		}
		sn := want[name]
		add(Finding{Kind: FindingMissingDevice, DeviceID: sn.DeviceID, Device: name, Key: sn.Key, Repairable: true,
			Message: fmt.Sprintf("%s snapshot %q has no dm device %s", sn.Kind, sn.Key, name)})
	}
	return out
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
