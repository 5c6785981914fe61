package snapshotter

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

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

// What writes to a full pool do, in Status.
const (
	WhenFullQueue = "queue"
	WhenFullError = "error"
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
	// WhenFull is what writes to the pool do when it is full: WhenFullQueue
	// (they wait: the pool grows itself) or WhenFullError (they fail at
	// once).
	WhenFull string

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
	// CheckInterval is how often the snapshotter checks itself (0: never);
	// LastCheck is the last self-check.
	CheckInterval time.Duration
	LastCheck     CheckRun

	// ImageFS is what the kubelet sees of the image filesystem.
	ImageFS ImageFSStatus

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
	DroppedOperations  int // interrupted commits, undone
	FinishedCommits    int // interrupted commits, finished
	ReactivatedDevices int
	Duration           time.Duration
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
		CheckInterval:   s.cfg.CheckInterval,
		LastCheck:       s.lastCheck(),
	}
	s.admin.mu.Lock()
	out.LastRecovery = s.admin.recovery
	s.admin.mu.Unlock()
	out.ImageFS = s.imageFSStatus()
	if err := s.poolStatus(&out); err != nil {
		return out, err
	}
	if err := s.recordCounts(ctx, &out); err != nil {
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

// poolStatus fills in what the pool's status and table say.
func (s *Snapshotter) poolStatus(out *Status) error {
	st, err := s.pool.Status()
	if err != nil {
		return fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	blockSize := s.cfg.BlockSize
	var lowWater uint64
	if g, ok := s.pool.(poolGeometry); ok {
		pp, err := g.PoolParams()
		if err != nil {
			return fmt.Errorf("table of pool %s: %w", s.pool.Name(), err)
		}
		blockSize = dmsetup.Sectors(pp.BlockSizeSectors).Bytes()
		lowWater = pp.LowWaterMark
	}
	out.Mode = poolMode(st)
	out.NeedsCheck = st.NeedsCheck
	out.WhenFull = WhenFullQueue
	if st.NoSpacePolicy == dmsetup.ErrorIfNoSpace {
		out.WhenFull = WhenFullError
	}
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
	return nil
}

// recordCounts fills in what the database says: its transaction id, the
// pending entries, the warm devices and the records by kind.
func (s *Snapshotter) recordCounts(ctx context.Context, out *Status) error {
	return s.db.View(ctx, func(tx *storage.Tx) error {
		var err error
		if out.DBTransactionID, err = tx.TransactionID(); err != nil {
			return err
		}
		entries, err := tx.Journal()
		if err != nil {
			return err
		}
		out.PendingJournal = len(entries)
		for _, e := range entries {
			if e.Op == storage.OpDelete {
				out.PendingRemovals++
			}
		}
		warm, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		out.WarmDevices = len(warm)
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			if sn.State != storage.StateReady {
				out.NotReady++
				return nil
			}
			out.Snapshots[kindName(sn.Kind)]++
			return nil
		})
	})
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
