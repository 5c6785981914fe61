//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// ensureBase makes the base device: an empty filesystem every parentless
// snapshot starts from, so Prepare never runs mkfs. It is made once per
// pool and filesystem settings.
func (s *Snapshotter) ensureBase(ctx context.Context) error {
	var pi storage.PoolInfo
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		pi, err = tx.PoolInfo()
		return err
	}); err != nil {
		return err
	}
	if pi.BaseDeviceID != 0 && pi.BaseSize == s.cfg.BaseSize && pi.BaseFSType == s.cfg.FSType {
		return nil
	}
	if pi.BaseDeviceID != 0 {
		// Existing snapshots keep the old base as their ancestor; it stays.
		log.G(ctx).WithField("old_id", pi.BaseDeviceID).Infof("base settings changed (%s %d bytes → %s %d bytes): making a new base device",
			pi.BaseFSType, pi.BaseSize, s.cfg.FSType, s.cfg.BaseSize)
	}

	var (
		e       storage.Entry
		next    uint64
		txSet   bool
		created bool
		err     error
	)
	for attempt := 1; ; attempt++ {
		var journal error
		next, txSet, err = s.poolStep(func() error {
			e = storage.Entry{Op: storage.OpCreateThin, Size: s.cfg.BaseSize}
			journal = s.db.Update(ctx, func(tx *storage.Tx) (err error) {
				if e.DeviceID, err = tx.AllocateID(); err != nil {
					return err
				}
				e.Seq, err = tx.AddJournal(e)
				return err
			})
			return journal
		}, func() error {
			err := s.pool.CreateThin(e.DeviceID)
			created = err == nil
			return err
		}, nil)
		if journal != nil {
			return journal
		}
		if !s.foreignID(ctx, e, err) {
			break
		}
		if attempt == maxIDTries {
			return errForeignIDs(err)
		}
	}
	e.TxID = next // for a rollback; not journaled

	name := s.deviceName(e.DeviceID)
	if err == nil {
		if err = s.pool.Activate(name, e.DeviceID, dmsetup.BytesToSectors(s.cfg.BaseSize), false); err == nil {
			err = s.timed(StepMkfs, func() error { return s.format(ctx, s.pool.DevicePath(name)) })
			err = errors.Join(err, s.pool.Deactivate(ctx, name))
		}
	}
	if err != nil {
		// A create the pool refused made nothing to delete: an id that
		// exists already belongs to someone else (an adopted pool's
		// devices, LVM's thin volumes).
		if created {
			err = errors.Join(err, s.pool.Deactivate(ctx, name))
			s.poolMu.Lock()
			err = errors.Join(err, ignoreNoData(s.pool.DeleteThin(e.DeviceID)))
			s.poolMu.Unlock()
		}
		return errors.Join(err, s.rollbackCreate(ctx, e, txSet))
	}
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		if err != nil {
			return err
		}
		pi.BaseDeviceID, pi.BaseSize, pi.BaseFSType = e.DeviceID, s.cfg.BaseSize, s.cfg.FSType
		if err := tx.SetPoolInfo(pi); err != nil {
			return err
		}
		if err := s.raiseTxID(tx, next); err != nil {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
	if err == nil {
		log.G(ctx).WithField("id", e.DeviceID).Infof("base device ready: %s, %d bytes", s.cfg.FSType, s.cfg.BaseSize)
	}
	return err
}

// mkfs makes the base filesystem with its metadata initialised up front
// (snapshots never pay for lazy init) and an empty 0755 root directory.
func (s *Snapshotter) mkfs(ctx context.Context, dev string) error {
	var bin string
	var args []string
	switch s.cfg.FSType {
	case "ext4":
		bin = "mkfs.ext4"
		args = []string{"-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"}
	case "xfs":
		bin = "mkfs.xfs"
		args = []string{"-q", "-f", "-K"}
	}
	// The administrator's options come last so they win.
	args = append(args, s.cfg.MkfsOptions...)
	args = append(args, dev)
	if out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %w: %s", bin, args, err, out)
	}

	dir, err := os.MkdirTemp(s.cfg.Root, "base-")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	data := ""
	if s.cfg.FSType == "xfs" {
		data = "nouuid"
	}
	if err := unix.Mount(dev, dir, s.cfg.FSType, 0, data); err != nil {
		return fmt.Errorf("mount base %s: %w", dev, err)
	}
	err = os.Remove(filepath.Join(dir, "lost+found"))
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if uerr := unix.Unmount(dir, 0); uerr != nil {
		err = errors.Join(err, fmt.Errorf("unmount base: %w", uerr))
	}
	return err
}
