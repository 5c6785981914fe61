package snapshotter

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Pool modes in Status: the kernel's three, and two that override them.
const (
	ModeRW             = string(dmsetup.PoolModeRW)
	ModeRO             = string(dmsetup.PoolModeRO)
	ModeOutOfDataSpace = string(dmsetup.PoolModeOutOfDataSpace)
	// ModeNeedsCheck: the kernel set needs_check; the pool is read-only
	// until thin_check runs.
	ModeNeedsCheck = "needs_check"
	// ModeFail: the pool failed (status Fail or Error).
	ModeFail = "fail"
)

// MetadataBlockSize is dm-thin's fixed metadata block size in bytes.
const MetadataBlockSize = 4096

// Status is what an operator sees of the snapshotter and its pool; the
// admin API and the metrics serve it. Sizes are bytes.
type Status struct {
	Pool string
	// Mode is one of the Mode constants.
	Mode       string
	NeedsCheck bool

	PoolTransactionID uint64
	DBTransactionID   uint64

	DataBlockSize                  uint64
	DataUsed, DataTotal            uint64
	MetadataUsed, MetadataTotal    uint64
	DataLowWaterMark               uint64 // from the pool table; 0 when none
	MetadataLowWaterMark           uint64 // from the kernel (>= 4.19); 0 when unknown
	DataLowWater, MetadataLowWater bool   // free space at or below the mark

	// Snapshots counts the ready records by kind ("active", "view",
	// "committed"); NotReady those left creating or removing.
	Snapshots map[string]int
	NotReady  int
	// ActiveDevices counts the dm devices of the pool's thin volumes.
	ActiveDevices int
	// PendingJournal counts the journal entries (operations in flight, or
	// interrupted); PendingRemovals the removals among them.
	PendingJournal  int
	PendingRemovals int
	// WarmDevices counts the devices made ahead for a committed
	// snapshot's next child (not in PendingJournal).
	WarmDevices int

	LastRecovery Recovery

	// Thresholds in force: the free percentages below which new devices
	// are refused (0: off).
	MinFreeData, MinFreeMetadata float64
	AsyncRemove                  bool
}

// Recovery is what the startup recovery of this process did.
type Recovery struct {
	RolledBackCreates  int
	FinishedRemovals   int
	DeferredRemovals   int // device still open: left pending
	DroppedOperations  int // interrupted commits
	ReactivatedDevices int
	Duration           time.Duration
}

// Step names a kernel step whose latency a StepObserver sees.
type Step string

// Kernel steps observed.
const (
	StepCreateSnap Step = "create_snap"
	StepActivate   Step = "activate"
	StepDeactivate Step = "deactivate"
	StepDelete     Step = "delete"
	StepMkfs       Step = "mkfs"
	// StepGrow is a filesystem grown to a larger device (max-size).
	StepGrow Step = "grow"
)

// Steps lists every Step, for observers that declare them up front.
var Steps = []Step{StepCreateSnap, StepActivate, StepDeactivate, StepDelete, StepMkfs, StepGrow}

// StepObserver is told how long each kernel step took and whether it
// failed. It is called on the hot path: it must be quick and must not
// block.
type StepObserver interface {
	ObserveStep(step Step, d time.Duration, err error)
}

// adminState is the snapshotter's bookkeeping for Status and observers.
type adminState struct {
	observer atomic.Pointer[observerBox]

	mu       sync.Mutex
	recovery Recovery
}

type observerBox struct{ o StepObserver }

// SetStepObserver makes o see every kernel step from now on; nil stops it.
func (s *Snapshotter) SetStepObserver(o StepObserver) {
	if o == nil {
		s.admin.observer.Store(nil)
		return
	}
	s.admin.observer.Store(&observerBox{o})
}

// timed runs fn, the kernel step step, and tells the observer.
func (s *Snapshotter) timed(step Step, fn func() error) error {
	box := s.admin.observer.Load()
	if box == nil {
		return fn()
	}
	start := time.Now()
	err := fn()
	box.o.ObserveStep(step, time.Since(start), err)
	return err
}

// recovered adds to the counts of the last recovery.
func (s *Snapshotter) recovered(fn func(r *Recovery)) {
	s.admin.mu.Lock()
	defer s.admin.mu.Unlock()
	fn(&s.admin.recovery)
}

// poolGeometry reads the pool's table; dmPool implements it. Without it
// (the unit tests' fake pool) Status reports blocks of Config.BlockSize.
type poolGeometry interface {
	PoolParams() (dmsetup.PoolParams, error)
}

// PoolParams reads the thin-pool table of the pool.
func (p *dmPool) PoolParams() (dmsetup.PoolParams, error) {
	t, err := p.c.Table(p.name)
	if err != nil {
		return dmsetup.PoolParams{}, err
	}
	if len(t) != 1 || t[0].Type != "thin-pool" {
		return dmsetup.PoolParams{}, fmt.Errorf("device %s is not a thin pool (table %v): %w", p.name, t, errdefs.ErrFailedPrecondition)
	}
	return dmsetup.ParsePoolParams(t[0].Params)
}

// Status reads the pool's status and table (two ioctls), the database (one
// read transaction) and the list of dm devices. It does not wait for
// operations in flight.
func (s *Snapshotter) Status(ctx context.Context) (Status, error) {
	out := Status{
		Pool:            s.pool.Name(),
		Snapshots:       map[string]int{},
		MinFreeData:     s.cfg.MinFreeData,
		MinFreeMetadata: s.cfg.MinFreeMetadata,
		AsyncRemove:     s.cfg.AsyncRemove,
	}
	s.admin.mu.Lock()
	out.LastRecovery = s.admin.recovery
	s.admin.mu.Unlock()

	st, err := s.pool.Status()
	if err != nil {
		return out, fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	blockSize := s.cfg.BlockSize
	var lowWater uint64
	if g, ok := s.pool.(poolGeometry); ok {
		pp, err := g.PoolParams()
		if err != nil {
			return out, fmt.Errorf("table of pool %s: %w", s.pool.Name(), err)
		}
		blockSize = dmsetup.Sectors(pp.BlockSizeSectors).Bytes()
		lowWater = pp.LowWaterMark
	}
	out.Mode = poolMode(st)
	out.NeedsCheck = st.NeedsCheck
	out.PoolTransactionID = st.TransactionID
	out.DataBlockSize = blockSize
	out.DataUsed, out.DataTotal = st.UsedDataBlocks*blockSize, st.TotalDataBlocks*blockSize
	out.MetadataUsed, out.MetadataTotal = st.UsedMetaBlocks*MetadataBlockSize, st.TotalMetaBlocks*MetadataBlockSize
	out.DataLowWaterMark = lowWater * blockSize
	if st.HasMetadataLowWatermark {
		out.MetadataLowWaterMark = st.MetadataLowWatermark * MetadataBlockSize
	}
	// The kernel raises its event when free space falls to the mark.
	out.DataLowWater = lowWater > 0 && st.TotalDataBlocks-min(st.UsedDataBlocks, st.TotalDataBlocks) <= lowWater
	out.MetadataLowWater = st.HasMetadataLowWatermark && st.MetadataLowWatermark > 0 &&
		st.TotalMetaBlocks-min(st.UsedMetaBlocks, st.TotalMetaBlocks) <= st.MetadataLowWatermark

	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		var err error
		if out.DBTransactionID, err = tx.TransactionID(); err != nil {
			return err
		}
		entries, err := tx.Journal()
		if err != nil {
			return err
		}
		for _, e := range entries {
			switch e.Op {
			case storage.OpWarm:
				out.WarmDevices++
				continue
			case storage.OpDelete:
				out.PendingRemovals++
			}
			out.PendingJournal++
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			if sn.State != storage.StateReady {
				out.NotReady++
				return nil
			}
			out.Snapshots[kindName(sn.Kind)]++
			return nil
		})
	}); err != nil {
		return out, err
	}

	devs, err := s.pool.List()
	if err != nil {
		return out, fmt.Errorf("listing dm devices: %w", err)
	}
	prefix := dmsetup.DeviceNamePrefix(s.pool.Name())
	for _, d := range devs {
		if strings.HasPrefix(d.Name, prefix) {
			out.ActiveDevices++
		}
	}
	return out, nil
}

// poolMode is the one word for the pool's state: a failure or needs_check
// overrides the kernel's mode.
func poolMode(st dmsetup.PoolStatus) string {
	switch {
	case st.Fail || st.Error:
		return ModeFail
	case st.NeedsCheck:
		return ModeNeedsCheck
	}
	return string(st.Mode)
}

// Snapshot kinds in Status and Device, as containerd prints them, and the
// base device's.
const (
	KindActive    = "active"
	KindView      = "view"
	KindCommitted = "committed"
	KindBase      = "base"
)

// Kinds lists the snapshot kinds Status counts.
var Kinds = []string{KindActive, KindView, KindCommitted}

func kindName(k snapshots.Kind) string {
	switch k {
	case snapshots.KindActive:
		return KindActive
	case snapshots.KindView:
		return KindView
	case snapshots.KindCommitted:
		return KindCommitted
	}
	return k.String()
}

// Device is one thin device the snapshotter knows of. Sizes are bytes.
type Device struct {
	ID   uint32
	Name string // dm name
	// Key of the snapshot; empty for the base and pending removals.
	Key string
	// Kind is one of the Kind constants; empty for a pending removal.
	Kind string
	// State is "ready", "creating", "removing" (a record), "removing"
	// for a journaled removal whose record is gone already, or "warm" for
	// a device made ahead for a child of committed snapshot Key.
	State string
	// Active says the dm device exists; OpenCount, ReadOnly and
	// MappedBytes are only known then.
	Active      bool
	OpenCount   int32
	ReadOnly    bool
	MappedBytes uint64
	VirtualSize uint64
}

// DeviceWarm is the State of a warm device.
const DeviceWarm = "warm"

// Devices lists the thin devices of the records, the base device, the
// warm devices and the pending removals, by id, with the state of their dm devices.
func (s *Snapshotter) Devices(ctx context.Context) ([]Device, error) {
	byID := map[uint32]*Device{}
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		if err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if pi.BaseDeviceID != 0 {
			byID[pi.BaseDeviceID] = &Device{ID: pi.BaseDeviceID, Kind: KindBase, State: storage.StateReady.String(), VirtualSize: pi.BaseSize}
		}
		entries, err := tx.Journal()
		if err != nil {
			return err
		}
		for _, e := range entries {
			switch e.Op {
			case storage.OpDelete:
				byID[e.DeviceID] = &Device{ID: e.DeviceID, State: storage.StateRemoving.String()}
			case storage.OpWarm:
				byID[e.DeviceID] = &Device{ID: e.DeviceID, Key: e.Key, State: DeviceWarm, VirtualSize: e.Size}
			}
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			byID[sn.DeviceID] = &Device{ID: sn.DeviceID, Key: sn.Key, Kind: kindName(sn.Kind), State: sn.State.String(), VirtualSize: sn.Size}
			return nil
		})
	}); err != nil {
		return nil, err
	}
	out := make([]Device, 0, len(byID))
	for _, id := range sortedKeys(byID) {
		d := byID[id]
		d.Name = s.deviceName(id)
		info, err := s.pool.Info(d.Name)
		switch {
		case err == nil:
			d.Active, d.OpenCount, d.ReadOnly = true, info.OpenCount, info.ReadOnly
			if ts, err := s.pool.ThinStatus(d.Name); err == nil {
				d.MappedBytes = ts.MappedSectors.Bytes()
			} else if !dmsetup.IsNotFound(err) {
				return nil, fmt.Errorf("status of %s: %w", d.Name, err)
			}
		case !dmsetup.IsNotFound(err):
			return nil, fmt.Errorf("dm device %s: %w", d.Name, err)
		}
		out = append(out, *d)
	}
	return out, nil
}

// CheckOnline is Check without repair on a serving snapshotter. Each pass
// takes the pool's metadata snapshot and reads the database with no pool
// step running (gather holds poolMu for that, not while thin_ls reads the
// snapshot), but creates, commits and removals between
// their steps still look like pending entries, and dm devices change
// outside poolMu. So it checks twice and reports only the findings seen
// the same both times: what an operation in flight causes passes.
func (s *Snapshotter) CheckOnline(ctx context.Context) (*Report, error) {
	first, err := s.Check(ctx, CheckOptions{})
	if err != nil {
		return nil, err
	}
	if first.Clean {
		first.Online = true
		return first, nil
	}
	second, err := s.Check(ctx, CheckOptions{})
	if err != nil {
		return nil, err
	}
	seen := map[Finding]bool{}
	for _, f := range first.Findings {
		seen[f] = true
	}
	kept := []Finding{}
	for _, f := range second.Findings {
		if seen[f] {
			kept = append(kept, f)
		}
	}
	second.Online = true
	second.Findings, second.Remaining = kept, kept
	second.Clean = len(kept) == 0
	return second, nil
}
