package snapshotter

// Check compares the database with the pool's real contents and, with
// Repair, fixes what is safe to fix.
//
// Sources compared: the thin ids in the pool metadata (read from a metadata
// snapshot with thin_ls, or thin_dump, of thin-provisioning-tools), the dm
// devices named <pool>-snap-<id> with their tables, the snapshot records,
// the id table, the journal and the two transaction ids.
//
// # JSON
//
// `thin-snapshotter check --json` prints one Report. The shape is stable:
// fields are only ever added.
//
//	{
//	  "root": "/var/lib/thin-snapshotter",
//	  "pool": "thin-0123456789ab-pool",
//	  "repair": false,                  // whether --repair ran
//	  "pool_transaction_id": 12,
//	  "db_transaction_id": 12,
//	  "base_device_id": 1,
//	  "pool_devices": [1, 2, 5],        // thin ids in the pool metadata, ascending
//	  "records": 2,                     // snapshot records in the database
//	  "findings": [                     // found before any repair; [] when none
//	    {
//	      "kind": "orphan",             // one of the Finding* kinds below
//	      "device_id": 5,               // thin id; 0 when none
//	      "device": "thin-0123456789ab-pool-snap-5", // dm name; "" when none
//	      "key": "",                    // snapshot key; "" when none
//	      "message": "thin device 5 is in the pool but in no record, journal entry or the base",
//	      "repairable": true,           // --repair would try to fix it
//	      "action": "deleted thin device 5 from the pool", // what --repair did; "" otherwise
//	      "repaired": true,             // --repair fixed it
//	      "error": ""                   // why the repair failed; "" otherwise
//	    }
//	  ],
//	  "remaining": [],                  // problems left, same element shape: the findings
//	                                    // without --repair, a fresh check after it
//	  "clean": true                     // remaining is empty
//	}
//
// Kinds: orphan, ghost, base_missing, wrong_device, stale_device,
// missing_device, pending_journal, not_ready, leaked_id, id_conflict,
// txid_mismatch, pool_unhealthy (see the Finding* constants).
//
// # Repair
//
// Repair refuses to touch the pool when the pool may not be this database's
// (the transaction ids differ by more than the pending journal entries
// explain, or the recorded pool name differs) or when the pool is failed,
// read-only or needs thin_check: then every finding stays for a person.
// Otherwise, in this order:
//   - pending journal entries: the startup recovery finishes or rolls back
//     each one, which also aligns the database's transaction id;
//   - stale and wrong dm devices are removed unless open (a wrong one is
//     then activated with the right table);
//   - records left creating or removing are removed with their devices;
//   - orphans are deleted from the pool, journaled like any removal;
//   - leaked ids are released;
//   - missing devices of active snapshots and views are activated;
//   - a missing base device is made again.
//
// Ghosts (a record whose thin device is gone: its data is lost) are only
// reported, unless RemoveGhosts is set: then their records are removed
// (leaves first; a ghost with live children stays). id_conflict and
// pool_unhealthy always need a person.
//
// Repair needs a snapshotter from OpenForCheck: on a serving one it would
// race with calls in flight. A read-only Check of a serving snapshotter
// works but may report operations in flight as pending journal entries.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// FindingKind names a kind of inconsistency.
type FindingKind string

const (
	// FindingOrphan: a thin id in the pool that no record, journal entry
	// or the base explains.
	FindingOrphan FindingKind = "orphan"
	// FindingGhost: a ready record whose thin device is not in the pool.
	FindingGhost FindingKind = "ghost"
	// FindingBaseMissing: the base device is not in the pool.
	FindingBaseMissing FindingKind = "base_missing"
	// FindingWrongDevice: the dm device named for a record's id maps
	// something else (another id, another pool, another size or mode).
	FindingWrongDevice FindingKind = "wrong_device"
	// FindingStaleDevice: a dm device named like ours that no active
	// snapshot or view needs (no record, a committed one, the base).
	FindingStaleDevice FindingKind = "stale_device"
	// FindingMissingDevice: an active snapshot or view without dm device.
	FindingMissingDevice FindingKind = "missing_device"
	// FindingPendingJournal: an operation a crash interrupted.
	FindingPendingJournal FindingKind = "pending_journal"
	// FindingNotReady: a record left creating or removing without a
	// journal entry.
	FindingNotReady FindingKind = "not_ready"
	// FindingLeakedID: an id allocated in the database with no record,
	// journal entry or base, and not in the pool.
	FindingLeakedID FindingKind = "leaked_id"
	// FindingIDConflict: a record's id is not allocated to it, or two
	// records share an id.
	FindingIDConflict FindingKind = "id_conflict"
	// FindingTxIDMismatch: the database's transaction id is not the
	// pool's.
	FindingTxIDMismatch FindingKind = "txid_mismatch"
	// FindingPoolUnhealthy: the pool is failed, read-only or needs
	// thin_check.
	FindingPoolUnhealthy FindingKind = "pool_unhealthy"
)

// Finding is one inconsistency, and what Repair did about it.
type Finding struct {
	Kind       FindingKind `json:"kind"`
	DeviceID   uint32      `json:"device_id"`
	Device     string      `json:"device"`
	Key        string      `json:"key"`
	Message    string      `json:"message"`
	Repairable bool        `json:"repairable"`
	Action     string      `json:"action"`
	Repaired   bool        `json:"repaired"`
	Error      string      `json:"error"`

	seq uint64 // journal sequence of a pending entry
}

// Report is the outcome of Check; see the package documentation of check.go
// for its JSON form.
type Report struct {
	Root              string    `json:"root"`
	Pool              string    `json:"pool"`
	Repair            bool      `json:"repair"`
	PoolTransactionID uint64    `json:"pool_transaction_id"`
	DBTransactionID   uint64    `json:"db_transaction_id"`
	BaseDeviceID      uint32    `json:"base_device_id"`
	PoolDevices       []uint32  `json:"pool_devices"`
	Records           int       `json:"records"`
	Findings          []Finding `json:"findings"`
	Remaining         []Finding `json:"remaining"`
	Clean             bool      `json:"clean"`
}

// CheckOptions select what Check may change.
type CheckOptions struct {
	// Repair fixes what is safe to fix.
	Repair bool
	// RemoveGhosts (with Repair) removes the records of snapshots whose
	// thin device is gone.
	RemoveGhosts bool
}

// poolInspector is what Check needs from the kernel beyond Pool. dmPool
// implements it; the fake pool of the unit tests too.
type poolInspector interface {
	// MetadataThinIDs lists the thin ids in the pool metadata.
	MetadataThinIDs(ctx context.Context) ([]uint32, error)
	// ThinTable returns the thin target parameters and length in sectors
	// of dm device name; ErrMalformed-wrapped when it is not one thin
	// target.
	ThinTable(name string) (dmsetup.ThinParams, uint64, error)
	// PoolDevice is the pool as thin tables name it (major:minor).
	PoolDevice() string
}

// OpenForCheck opens the snapshotter state under cfg.Root for Check without
// changing anything: no recovery, no base device, no background worker.
// The embedded pool is set up when missing (after a reboot), from its
// existing files only. Fails with a clear error while the daemon runs.
func OpenForCheck(ctx context.Context, cfg Config) (*Snapshotter, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	dbPath := filepath.Join(cfg.Root, dbFile)
	if _, err := os.Stat(dbPath); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no database at %s (has the daemon ever run with this root?): %w", dbPath, errdefs.ErrNotFound)
		}
		return nil, err
	}
	client, err := dmsetup.Open()
	if err != nil {
		return nil, fmt.Errorf("device-mapper: %w", err)
	}
	closers := []func() error{client.Close}
	fail := func(err error) (*Snapshotter, error) {
		for i := len(closers) - 1; i >= 0; i-- {
			_ = closers[i]()
		}
		return nil, err
	}
	db, err := storage.Open(ctx, dbPath)
	if err != nil {
		if errors.Is(err, storage.ErrInUse) {
			return fail(fmt.Errorf("the daemon is running (database in use): stop it first: %w", err))
		}
		return fail(err)
	}
	closers = append(closers, db.Close)

	name := cfg.PoolName
	if name == "" {
		if name, err = LoopPoolName(cfg.Root); err != nil {
			return fail(err)
		}
		dir := filepath.Join(cfg.Root, poolDir)
		for _, f := range []string{dmsetup.LoopDataFile, dmsetup.LoopMetadataFile} {
			// A missing file would be created empty: a new pool, and
			// every record a ghost.
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				return fail(fmt.Errorf("embedded pool file: %w", err))
			}
		}
		if _, err := dmsetup.CreateLoopPool(ctx, client, dmsetup.LoopPoolConfig{
			Dir:              dir,
			Name:             name,
			DataSize:         cfg.DataSize,
			MetadataSize:     cfg.MetadataSize,
			BlockSizeSectors: uint32(cfg.BlockSize / 512),
			ErrorIfNoSpace:   true, // as New sets the pool up after a reboot
		}); err != nil {
			return fail(fmt.Errorf("embedded pool: %w", err))
		}
	}
	pool, err := newDMPool(client, name)
	if err != nil {
		return fail(err)
	}
	s, err := openCheck(ctx, cfg, db, pool, nil)
	if err != nil {
		return fail(err)
	}
	s.closers = closers
	return s, nil
}

// openCheck is OpenForCheck after the kernel side is open (unit tests pass
// a fake pool). The snapshotter has no worker: stop stays nil, which is
// what lets Check repair.
func openCheck(ctx context.Context, cfg Config, db *storage.DB, pool Pool, format func(context.Context, string) error) (*Snapshotter, error) {
	cfg.setDefaults()
	s := &Snapshotter{
		cfg:      cfg,
		db:       db,
		pool:     pool,
		deleting: map[uint64]bool{},
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
		format:   format,
	}
	if format == nil {
		s.format = s.mkfs
	}
	st, err := pool.Status()
	if err != nil {
		return nil, fmt.Errorf("status of pool %s: %w", pool.Name(), err)
	}
	s.txid = st.TransactionID
	return s, nil
}

// Check compares the database with the pool and, with opts.Repair, fixes
// what is safe. The error is for a check that could not run; problems found
// are in the report.
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

// checkState is everything Check compares, read with no operation running.
type checkState struct {
	status  dmsetup.PoolStatus
	poolTx  uint64
	dbTx    uint64
	pi      storage.PoolInfo
	hasPI   bool
	inPool  map[uint32]bool
	records []storage.Snapshot
	ids     map[uint32]string // allocated id → owner
	journal []storage.Entry
	devices map[string]devState // dm devices named <pool>-snap-*
}

type devState struct {
	info    dmsetup.Info
	params  dmsetup.ThinParams
	sectors uint64
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
	st := &checkState{inPool: map[uint32]bool{}, ids: map[uint32]string{}, devices: map[string]devState{}}
	if st.status, err = s.pool.Status(); err != nil {
		return nil, fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	st.poolTx = st.status.TransactionID
	ids, err := in.MetadataThinIDs(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		st.inPool[id] = true
	}
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		var err error
		st.pi, err = tx.PoolInfo()
		switch {
		case err == nil:
			st.hasPI = true
		case !errdefs.IsNotFound(err):
			return err
		}
		if st.dbTx, err = tx.TransactionID(); err != nil {
			return err
		}
		if st.journal, err = tx.Journal(); err != nil {
			return err
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
	prefix := s.pool.Name() + "-snap-"
	for _, d := range devs {
		if !strings.HasPrefix(d.Name, prefix) {
			continue
		}
		var ds devState
		if ds.info, err = s.pool.Info(d.Name); err != nil {
			if dmsetup.IsNotFound(err) {
				continue // removed meanwhile
			}
			return nil, fmt.Errorf("dm device %s: %w", d.Name, err)
		}
		ds.params, ds.sectors, ds.err = in.ThinTable(d.Name)
		st.devices[d.Name] = ds
	}
	return st, nil
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

	for _, id := range st.poolIDs() {
		if _, ok := owned[id]; ok || id == base || journaled[id] {
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
		if _, ok := owned[id]; ok || id == base || journaled[id] || st.inPool[id] {
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
			why := "no record has thin device " + strings.TrimPrefix(name, s.pool.Name()+"-snap-")
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
			if d.sectors != sn.Size/512 {
				wrong = append(wrong, fmt.Sprintf("is %d sectors, not %d", d.sectors, sn.Size/512))
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

// poolIsOurs tells whether the pool is the one this database manages, as
// far as the transaction ids tell, and why not.
func (s *Snapshotter) poolIsOurs(st *checkState) (bool, string) {
	switch {
	case !st.hasPI:
		return false, "the database has no pool recorded (the daemon never finished starting on it)"
	case st.pi.Name != s.pool.Name():
		return false, fmt.Sprintf("the database belongs to pool %s", st.pi.Name)
	case st.poolTx < st.dbTx || st.poolTx > st.dbTx+uint64(len(st.journal)):
		return false, "not explained by the pending journal entries: a re-created pool, or someone else's (the daemon's allow_adopt takes it over)"
	}
	return true, ""
}

// idOfName is the thin id in a device name <pool>-snap-<id>.
func (s *Snapshotter) idOfName(name string) (uint32, bool) {
	n, err := strconv.ParseUint(strings.TrimPrefix(name, s.pool.Name()+"-snap-"), 10, 32)
	if err != nil || n == 0 || n > uint64(storage.MaxDeviceID) || s.deviceName(uint32(n)) != name {
		return 0, false
	}
	return uint32(n), true
}

func sortedKeys[K string | uint32, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// repair acts on the findings in place, in the order the documentation
// gives; every step is journaled like a normal operation where it touches
// the pool.
func (s *Snapshotter) repair(ctx context.Context, st *checkState, fs []Finding, opts CheckOptions) {
	if ok, why := s.poolIsOurs(st); !ok {
		refuse(fs, "not repaired: the pool may not be this database's: "+why)
		return
	}
	for _, f := range fs {
		if f.Kind == FindingPoolUnhealthy {
			refuse(fs, "not repaired: the pool is unhealthy; check its metadata with thin_check first")
			return
		}
	}
	done := func(f *Finding, action string, err error) {
		f.Action = action
		if err != nil {
			f.Error = err.Error()
			return
		}
		f.Repaired = true
	}
	byKind := func(k FindingKind) []*Finding {
		var out []*Finding
		for i := range fs {
			if fs[i].Kind == k {
				out = append(out, &fs[i])
			}
		}
		return out
	}

	// The journal first, with the startup recovery itself. Its
	// reactivation pass may fail on a ghost; what it left pending shows.
	if pend := byKind(FindingPendingJournal); len(pend) > 0 || len(byKind(FindingTxIDMismatch)) > 0 {
		rerr := s.recover(ctx)
		left := map[uint64]bool{}
		_ = s.db.View(ctx, func(tx *storage.Tx) error {
			entries, err := tx.Journal()
			for _, e := range entries {
				left[e.Seq] = true
			}
			return err
		})
		for _, f := range pend {
			err := rerr
			if !left[f.seq] {
				err = nil
			} else if err == nil {
				err = errors.New("still pending (device open?)")
			}
			done(f, "ran recovery for the entry", err)
		}
		for _, f := range byKind(FindingTxIDMismatch) {
			done(f, "recorded the pool's transaction id after recovery", nil)
		}
	}

	for _, f := range append(byKind(FindingStaleDevice), byKind(FindingWrongDevice)...) {
		if !f.Repairable {
			continue
		}
		err := s.deactivateIdle(ctx, f.Device)
		action := "removed dm device " + f.Device
		if err == nil && f.Kind == FindingWrongDevice {
			err = s.activateRecord(ctx, f.Key)
			action += " and activated it again"
		}
		done(f, action, err)
	}

	for _, f := range byKind(FindingNotReady) {
		var e storage.Entry
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			sn, err := tx.RemoveSnapshot(f.Key)
			if err != nil {
				return err
			}
			e = storage.Entry{Op: storage.OpDelete, DeviceID: sn.DeviceID, Key: f.Key}
			e.Seq, err = tx.AddJournal(e)
			return err
		})
		if err == nil {
			err = s.finishDelete(ctx, e)
		}
		done(f, fmt.Sprintf("removed record %q and thin device %d", f.Key, f.DeviceID), err)
	}

	for _, f := range byKind(FindingOrphan) {
		var e storage.Entry
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			// Reserved first so the allocator cannot hand it out while
			// the delete is in flight.
			if used, err := tx.IDInUse(f.DeviceID); err != nil {
				return err
			} else if !used {
				if err := tx.ReserveID(f.DeviceID); err != nil {
					return err
				}
			}
			e = storage.Entry{Op: storage.OpDelete, DeviceID: f.DeviceID}
			var err error
			e.Seq, err = tx.AddJournal(e)
			return err
		})
		if err == nil {
			err = s.finishDelete(ctx, e)
		}
		done(f, fmt.Sprintf("deleted thin device %d from the pool", f.DeviceID), err)
	}

	for _, f := range byKind(FindingLeakedID) {
		err := s.db.Update(ctx, func(tx *storage.Tx) error { return tx.ReleaseID(f.DeviceID) })
		done(f, fmt.Sprintf("released id %d", f.DeviceID), err)
	}

	for _, f := range byKind(FindingMissingDevice) {
		done(f, "activated dm device "+f.Device, s.activateRecord(ctx, f.Key))
	}

	for _, f := range byKind(FindingBaseMissing) {
		err := s.db.Update(ctx, func(tx *storage.Tx) error {
			pi, err := tx.PoolInfo()
			if err != nil {
				return err
			}
			if err := tx.ReleaseID(pi.BaseDeviceID); err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			pi.BaseDeviceID = 0
			return tx.SetPoolInfo(pi)
		})
		if err == nil {
			err = s.ensureBase(ctx)
		}
		done(f, "made a new base device", err)
	}

	if opts.RemoveGhosts {
		ghosts := byKind(FindingGhost)
		// Leaves first: a parent goes once its ghost children went.
		for progress := true; progress; {
			progress = false
			for _, f := range ghosts {
				if f.Repaired {
					continue
				}
				err := s.db.Update(ctx, func(tx *storage.Tx) error {
					sn, err := tx.RemoveSnapshot(f.Key)
					if err != nil {
						return err
					}
					return tx.ReleaseID(sn.DeviceID)
				})
				done(f, fmt.Sprintf("removed the record of %q (its device was gone)", f.Key), err)
				progress = progress || err == nil
			}
		}
	}
}

// refuse marks every finding as left for a person.
func refuse(fs []Finding, why string) {
	for i := range fs {
		fs[i].Action = why
	}
}

// deactivateIdle removes dm device name unless it is open.
func (s *Snapshotter) deactivateIdle(ctx context.Context, name string) error {
	info, err := s.pool.Info(name)
	if err != nil {
		if dmsetup.IsNotFound(err) {
			return nil
		}
		return err
	}
	if info.OpenCount > 0 {
		return fmt.Errorf("dm device %s is open (mounted?): %w", name, errdefs.ErrFailedPrecondition)
	}
	return s.pool.Deactivate(ctx, name)
}

// activateRecord activates the device of the ready active snapshot or view
// key.
func (s *Snapshotter) activateRecord(ctx context.Context, key string) error {
	sn, err := s.ready(ctx, key)
	if err != nil {
		return err
	}
	if sn.Kind == snapshots.KindCommitted {
		return nil
	}
	return s.pool.Activate(s.deviceName(sn.DeviceID), sn.DeviceID, sn.Size/512, sn.Kind == snapshots.KindView)
}

// thinTools are tried in order to list the thin ids of a metadata snapshot.
var thinTools = []struct {
	bin   string
	args  []string
	parse func([]byte) ([]uint32, error)
}{
	{"thin_ls", []string{"--metadata-snap", "--no-headers", "-o", "DEV"}, parseThinLs},
	{"thin_dump", []string{"--metadata-snap", "--skip-mappings"}, parseThinDump},
}

// MetadataThinIDs reads the thin ids from a metadata snapshot of the pool,
// which stays consistent while the pool runs; the snapshot is always
// released afterwards.
func (p *dmPool) MetadataThinIDs(ctx context.Context) ([]uint32, error) {
	var bin string
	var tool int
	for i, t := range thinTools {
		if path, err := exec.LookPath(t.bin); err == nil {
			bin, tool = path, i
			break
		}
	}
	if bin == "" {
		return nil, fmt.Errorf("neither thin_ls nor thin_dump found in PATH: install thin-provisioning-tools: %w", errdefs.ErrNotImplemented)
	}
	table, err := p.c.Table(p.name)
	if err != nil {
		return nil, fmt.Errorf("table of pool %s: %w", p.name, err)
	}
	if len(table) != 1 || table[0].Type != "thin-pool" {
		return nil, fmt.Errorf("device %s is not a thin pool (table %v)", p.name, table)
	}
	params, err := dmsetup.ParsePoolParams(table[0].Params)
	if err != nil {
		return nil, fmt.Errorf("table of pool %s: %w", p.name, err)
	}
	node, cleanup, err := blockNode(params.MetadataDev)
	if err != nil {
		return nil, fmt.Errorf("metadata device of pool %s: %w", p.name, err)
	}
	defer cleanup()

	if err := p.c.ReserveMetadataSnap(p.name); err != nil {
		if dmsetup.IsBusy(err) {
			return nil, fmt.Errorf("pool %s already has a metadata snapshot (held by another tool, or left by an interrupted check: `dmsetup message %s 0 release_metadata_snap` drops it): %w", p.name, p.name, err)
		}
		return nil, fmt.Errorf("reserve_metadata_snap on %s: %w", p.name, err)
	}
	defer func() { _ = p.c.ReleaseMetadataSnap(p.name) }()

	t := thinTools[tool]
	tctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(tctx, bin, append(slices.Clone(t.args), node)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %v: %w: %s", t.bin, cmd.Args[1:], err, strings.TrimSpace(stderr.String()))
	}
	ids, err := t.parse(out)
	if err != nil {
		return nil, fmt.Errorf("%s output: %w", t.bin, err)
	}
	return ids, nil
}

// ThinTable reads the table of a thin device.
func (p *dmPool) ThinTable(name string) (dmsetup.ThinParams, uint64, error) {
	table, err := p.c.Table(name)
	if err != nil {
		return dmsetup.ThinParams{}, 0, err
	}
	if len(table) != 1 || table[0].Type != "thin" {
		return dmsetup.ThinParams{}, 0, fmt.Errorf("table %v is not one thin target: %w", table, dmsetup.ErrMalformed)
	}
	tp, err := dmsetup.ParseThinParams(table[0].Params)
	return tp, table[0].Length, err
}

// PoolDevice is the pool's major:minor, as thin tables name it.
func (p *dmPool) PoolDevice() string { return p.dev }

// blockNode finds a device node for dev (a path, or major:minor as tables
// name devices): the kernel's name from sysfs under /dev, else a temporary
// node removed by cleanup.
func blockNode(dev string) (string, func(), error) {
	noop := func() {}
	maj, min, ok := parseMajMin(dev)
	if !ok {
		return dev, noop, nil
	}
	want := unix.Mkdev(maj, min)
	if b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/uevent", maj, min)); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if name, ok := strings.CutPrefix(sc.Text(), "DEVNAME="); ok {
				path := filepath.Join("/dev", name)
				var st unix.Stat_t
				if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == want {
					return path, noop, nil
				}
			}
		}
	}
	dir, err := os.MkdirTemp("/dev", ".thin-check-")
	if err != nil {
		return "", noop, err
	}
	path := filepath.Join(dir, "metadata")
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(want)); err != nil {
		os.RemoveAll(dir)
		return "", noop, fmt.Errorf("mknod %s for %s: %w", path, dev, err)
	}
	return path, func() { os.RemoveAll(dir) }, nil
}

func parseMajMin(s string) (uint32, uint32, bool) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, false
	}
	maj, err1 := strconv.ParseUint(a, 10, 32)
	min, err2 := strconv.ParseUint(b, 10, 32)
	return uint32(maj), uint32(min), err1 == nil && err2 == nil
}

// parseThinLs reads `thin_ls --no-headers -o DEV`: one id a line.
func parseThinLs(out []byte) ([]uint32, error) {
	var ids []uint32
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		id, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil || len(f) != 1 {
			return nil, fmt.Errorf("unexpected line %q: %w", line, dmsetup.ErrMalformed)
		}
		ids = append(ids, uint32(id))
	}
	slices.Sort(ids)
	return ids, nil
}

// parseThinDump reads the dev_id of every <device> of thin_dump's XML.
func parseThinDump(out []byte) ([]uint32, error) {
	dec := xml.NewDecoder(bytes.NewReader(out))
	var ids []uint32
	sawSuperblock := false
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", err, dmsetup.ErrMalformed)
		}
		el, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		switch el.Name.Local {
		case "superblock":
			sawSuperblock = true
		case "device":
			found := false
			for _, a := range el.Attr {
				if a.Name.Local == "dev_id" {
					id, err := strconv.ParseUint(a.Value, 10, 32)
					if err != nil {
						return nil, fmt.Errorf("dev_id %q: %w", a.Value, dmsetup.ErrMalformed)
					}
					ids = append(ids, uint32(id))
					found = true
				}
			}
			if !found {
				return nil, fmt.Errorf("device without dev_id: %w", dmsetup.ErrMalformed)
			}
		}
	}
	if !sawSuperblock {
		return nil, fmt.Errorf("no superblock element: %w", dmsetup.ErrMalformed)
	}
	slices.Sort(ids)
	return ids, nil
}
