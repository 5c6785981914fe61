package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// checkPoolHealth refuses new devices when the pool cannot take them: failed,
// read-only, needing a check, out of data space, or below the configured
// free-space thresholds. Existing snapshots stay usable. Short of space, it
// first finishes the removals waiting for the worker (containerd's garbage
// collection returns before they are done), then grows a pool that can
// grow, and checks again after each.
func (s *Snapshotter) checkPoolHealth(ctx context.Context) error {
	err := s.poolHealthNow()
	if !errdefs.IsResourceExhausted(err) {
		return err
	}
	if freed, ferr := s.finishRemovals(ctx, false); freed > 0 {
		if ferr != nil {
			log.G(ctx).WithError(ferr).Warn("pool short of space: pending removals not all finished")
		}
		if err = s.poolHealthNow(); !errdefs.IsResourceExhausted(err) {
			return err
		}
	}
	if s.autogrow == nil {
		return err
	}
	// Grow now (a few steps if need be) rather than fail while the
	// pool's low-water event is on its way.
	for range maxGrowSteps {
		grown, gerr := s.maybeGrow(context.Background())
		if gerr != nil || !grown {
			return errors.Join(err, gerr)
		}
		if err = s.poolHealthNow(); !errdefs.IsResourceExhausted(err) {
			return err
		}
	}
	return err
}

// poolHealthNow reads the pool's status and judges it (poolHealth).
func (s *Snapshotter) poolHealthNow() error {
	st, err := s.pool.Status()
	if err != nil {
		return fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	return poolHealth(s.pool.Name(), st, s.cfg.MinFreeData, s.cfg.MinFreeMetadata)
}

// maxGrowSteps bounds the steps one Prepare waits for.
const maxGrowSteps = 8

func poolHealth(name string, st dmsetup.PoolStatus, minData, minMeta float64) error {
	if err := poolFault(name, st); err != nil {
		return err
	}
	if st.Mode == dmsetup.PoolModeOutOfDataSpace {
		return fmt.Errorf("pool %s is out of data space (%d of %d blocks used): %w",
			name, st.UsedDataBlocks, st.TotalDataBlocks, errdefs.ErrResourceExhausted)
	}
	if st.TotalDataBlocks-min(st.UsedDataBlocks, st.TotalDataBlocks) < keptFree(st.TotalDataBlocks, minData) {
		free, _ := freePercent(st.UsedDataBlocks, st.TotalDataBlocks)
		return fmt.Errorf("pool %s: %.1f%% of data space free (%d of %d blocks used), below the %.1f%% threshold: %w",
			name, free, st.UsedDataBlocks, st.TotalDataBlocks, minData, errdefs.ErrResourceExhausted)
	}
	if free, ok := freePercent(st.UsedMetaBlocks, st.TotalMetaBlocks); ok && minMeta > 0 && free < minMeta {
		return fmt.Errorf("pool %s: %.1f%% of metadata space free (%d of %d blocks used), below the %.1f%% threshold: %w",
			name, free, st.UsedMetaBlocks, st.TotalMetaBlocks, minMeta, errdefs.ErrResourceExhausted)
	}
	return nil
}

// poolFault refuses every change to a pool that takes none: failed,
// needing a metadata check, or read-only. The error names the pool and its
// mode as Status shows it; only an operator brings such a pool back.
func poolFault(name string, st dmsetup.PoolStatus) error {
	if !st.ReadOnly() {
		return nil
	}
	mode := poolMode(st)
	var why string
	switch mode {
	case ModeFail:
		why = "its metadata cannot be read or written"
	case ModeNeedsCheck:
		why = "a metadata write failed and the kernel wants thin_check"
	default:
		why = "its metadata is full or was loaded read-only"
	}
	return fmt.Errorf("pool %s is in mode %s (%s): it takes no changes until repaired: %w",
		name, mode, why, errdefs.ErrFailedPrecondition)
}

// poolFaultNow reads the pool's status and refuses changes to a pool that
// takes none (poolFault).
func (s *Snapshotter) poolFaultNow() error {
	st, err := s.pool.Status()
	if err != nil {
		return fmt.Errorf("status of pool %s: %w", s.pool.Name(), err)
	}
	return poolFault(s.pool.Name(), st)
}

// blameFault returns err, a call's failure in the kernel, as the pool's
// fault when the pool takes no changes now: the kernel's own error (EIO,
// EOPNOTSUPP, EINVAL) says neither why nor that a retry is useless. The
// kernel error's text is kept, its kinds are not.
func (s *Snapshotter) blameFault(err error) error {
	var kerr *dmsetup.Error
	if !errors.As(err, &kerr) || errdefs.IsFailedPrecondition(err) {
		return err
	}
	st, serr := s.pool.Status()
	if serr != nil {
		return err
	}
	if ferr := poolFault(s.pool.Name(), st); ferr != nil {
		//nolint:errorlint // Only the pool's kind: the kernel's (EINVAL is InvalidArgument) would outrank it over gRPC.
		return fmt.Errorf("%w; the call failed with: %v", ferr, err)
	}
	return err
}

// keptFree is the free space (in the unit of total) that minFree percent
// keeps for running containers: with less, new devices are refused. The
// image filesystem mirror shows the kubelet only the free space beyond it.
func keptFree(total uint64, minFree float64) uint64 {
	if minFree <= 0 {
		return 0
	}
	return uint64(math.Ceil(float64(total) * minFree / 100))
}

func freePercent(used, total uint64) (float64, bool) {
	if total == 0 {
		return 0, false
	}
	return 100 * float64(total-min(used, total)) / float64(total), true
}
