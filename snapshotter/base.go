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
		// Thin snapshots do not need their origin: the old base goes
		// once the new one is recorded.
		log.G(ctx).WithField("old_id", pi.BaseDeviceID).Infof("base settings changed (%s %d bytes → %s %d bytes): making a new base device",
			pi.BaseFSType, pi.BaseSize, s.cfg.FSType, s.cfg.BaseSize)
	}
	e, err := s.createBaseThin(ctx)
	if err == nil {
		err = s.formatBase(ctx, e.DeviceID)
	}
	if err != nil {
		if e.Seq == 0 {
			return err // nothing journaled
		}
		// A create the pool refused with EEXIST made nothing of ours
		// to delete: the id is someone else's.
		return errors.Join(err, s.undo(ctx, e, !dmsetup.IsExist(err)))
	}
	var old []storage.Entry
	err = s.db.Update(ctx, func(tx *storage.Tx) error {
		old = nil // the transaction may run again
		pi, err := tx.PoolInfo()
		if err != nil {
			return err
		}
		if pi.BaseDeviceID != 0 {
			d := storage.Entry{Op: storage.OpDelete, DeviceID: pi.BaseDeviceID, Size: pi.BaseSize}
			if d.Seq, err = tx.AddJournal(d); err != nil {
				return err
			}
			old = append(old, d)
		}
		pi.BaseDeviceID, pi.BaseSize, pi.BaseFSType = e.DeviceID, s.cfg.BaseSize, s.cfg.FSType
		if err := tx.SetPoolInfo(pi); err != nil {
			return err
		}
		return tx.FinishJournal(e.Seq)
	})
	if err != nil {
		return err
	}
	log.G(ctx).WithField("id", e.DeviceID).Infof("base device ready: %s, %d bytes", s.cfg.FSType, s.cfg.BaseSize)
	if err := s.finishDeletes(ctx, old); err != nil {
		// Journaled: the worker finishes it.
		log.G(ctx).WithError(err).Warn("the old base device stays until the worker deletes it")
	}
	return nil
}

// createBaseThin journals and creates the base's thin device, and moves
// the pool's transaction id one step. The moved id marks the pool as this
// database's (a re-created pool has id 0); it is recorded at once, so the
// pool is never ahead of the database by more than its pending entries
// (poolOwnership). Ids the pool already has are skipped as foreign. On an
// error, the entry's Seq is 0 when nothing was journaled.
func (s *Snapshotter) createBaseThin(ctx context.Context) (storage.Entry, error) {
	for attempt := 1; ; attempt++ {
		e := storage.Entry{Op: storage.OpCreateThin, Size: s.cfg.BaseSize}
		if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
			if e.DeviceID, err = tx.AllocateID(); err != nil {
				return err
			}
			e.Seq, err = tx.AddJournal(e)
			return err
		}); err != nil {
			return storage.Entry{}, err
		}
		next, err := s.createThinLocked(e.DeviceID)
		if s.foreignID(ctx, e, err) {
			if attempt == maxIDTries {
				return storage.Entry{}, errForeignIDs(err)
			}
			continue
		}
		if err == nil {
			err = s.db.Update(ctx, func(tx *storage.Tx) error { return raiseTxID(tx, next) })
		}
		return e, err
	}
}

// createThinLocked creates thin id and moves the pool's transaction id to
// next, under poolMu.
func (s *Snapshotter) createThinLocked(id uint32) (next uint64, err error) {
	s.poolMu.Lock()
	defer s.poolMu.Unlock()
	next = s.txid + 1
	if err := s.pool.CreateThin(id); err != nil {
		return next, err
	}
	if err := s.pool.SetTransactionID(s.txid, next); err != nil {
		return next, err
	}
	s.txid = next
	return next, nil
}

// formatBase activates the base's device id, makes its filesystem and
// deactivates it again: only snapshots of it are ever mounted.
func (s *Snapshotter) formatBase(ctx context.Context, id uint32) error {
	name := s.deviceName(id)
	if err := s.activate(name, id, s.cfg.BaseSize, false); err != nil {
		return err
	}
	err := s.timed(StepMkfs, func() error { return s.format(ctx, s.pool.DevicePath(name)) })
	return errors.Join(err, s.deactivate(ctx, id))
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
