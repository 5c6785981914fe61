package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// ParseMaxSize reads a value of the max-size label: a whole number of
// bytes, as containerd defines it.
func ParseMaxSize(v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size in bytes: %w", v, errdefs.ErrInvalidArgument)
	}
	return n, nil
}

// blockAligned rounds a requested size down to whole filesystem blocks.
func blockAligned(n uint64) uint64 { return n - n%BaseSizeAlign }

// requestedSize is the size the max-size label of an active snapshot asks
// for, rounded down to whole filesystem blocks, or 0 without the label. A
// device never shrinks: less than current, the size it has (or inherits
// from its parent), is InvalidArgument.
func requestedSize(labels map[string]string, current uint64) (uint64, error) {
	v, ok := labels[snapshots.LabelSnapshotMaxSize]
	if !ok {
		return 0, nil
	}
	n, err := ParseMaxSize(v)
	if err != nil {
		return 0, fmt.Errorf("label %s: %w", snapshots.LabelSnapshotMaxSize, err)
	}
	n = blockAligned(n)
	switch {
	case n > maxDeviceSize:
		return 0, fmt.Errorf("label %s=%q: more than %s: %w", snapshots.LabelSnapshotMaxSize, v, humanSize(maxDeviceSize), errdefs.ErrInvalidArgument)
	case n < current:
		return 0, fmt.Errorf("label %s=%q: smaller than the %d bytes the filesystem has already (devices never shrink): %w",
			snapshots.LabelSnapshotMaxSize, v, current, errdefs.ErrInvalidArgument)
	}
	return n, nil
}

// Update changes the labels of a snapshot. Raising the max-size label of
// an active snapshot grows its device and filesystem, online when it is
// mounted; lowering it is InvalidArgument.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	unlock := s.keys.lock(info.Name)
	defer unlock()
	return s.update(ctx, info, fieldpaths...)
}

// update is Update with the key's lock held.
func (s *Snapshotter) update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (out snapshots.Info, err error) {
	var (
		old  storage.Snapshot
		size uint64
	)
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		size = 0 // the transaction may run again
		if old, err = tx.GetSnapshot(info.Name); err != nil {
			return err
		}
		if out, err = tx.UpdateInfo(info, fieldpaths...); err != nil {
			return err
		}
		if old.Kind != snapshots.KindActive {
			return nil
		}
		if size, err = requestedSize(out.Labels, old.Size); err != nil {
			return err
		}
		// Nothing to do when the device has the size already and the
		// old labels asked for it too. A grow that failed after the
		// device grew put the old labels back, so asking again runs
		// the filesystem's grow again.
		prev, _ := requestedSize(old.Labels, 0)
		if size == 0 || (size == old.Size && size <= prev) {
			size = 0
			return nil
		}
		// The record grows first: a device is never activated shorter
		// than its filesystem, whatever happens next.
		_, err = tx.SetSize(info.Name, size)
		return err
	})
	if err != nil || size == 0 {
		return out, err
	}

	name := s.deviceName(old.DeviceID)
	err = s.pool.Resize(name, old.DeviceID, dmsetup.BytesToSectors(size))
	resized := err == nil
	if err == nil {
		err = s.timed(StepGrow, func() error { return s.growFS(ctx, s.pool.DevicePath(name), old.FSType) })
	}
	if err == nil {
		return out, nil
	}
	// The labels go back so the same Update can be retried; the size
	// stays once the device has it.
	err = fmt.Errorf("grow %q to %d bytes: %w", info.Name, size, err)
	return snapshots.Info{}, errors.Join(err, s.db.Update(ctx, func(tx *storage.Tx) error {
		if _, err := tx.UpdateInfo(snapshots.Info{Name: info.Name, Labels: maps.Clone(old.Labels)}, "labels"); err != nil {
			return err
		}
		if !resized {
			_, err := tx.SetSize(info.Name, old.Size)
			return err
		}
		return nil
	}))
}
