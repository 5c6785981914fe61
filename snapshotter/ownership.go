package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolOwnership decides whether the pool known by names (poolNames), at
// transaction id poolTx, is the one the database manages. pi is the
// database's pool record (zero when it has none), dbTx its transaction id
// and pending the number of journal entries a crash may have left. The
// pool's transaction id must be the recorded one, or ahead of it by no more
// than the pending entries explain. New says the database has no pool yet
// and the pool was never used (transaction id 0): the daemon takes it as its
// own. Otherwise a non-empty mismatch says why the pool may not be the
// database's.
//
// The daemon at startup (checkOwnership) and Check's repair both decide with
// it, so they never disagree.
func poolOwnership(pi storage.PoolInfo, dbTx uint64, pending int, names []string, poolTx uint64) (isNew bool, mismatch string) {
	switch {
	case pi.Name == "" && poolTx != 0:
		return false, fmt.Sprintf("the database is new but the pool's transaction id is %d (the pool was used before, by another database or daemon)", poolTx)
	case pi.Name == "":
		return true, ""
	case !slices.Contains(names, pi.Name):
		return false, fmt.Sprintf("the database belongs to pool %s", pi.Name)
	case poolTx < dbTx || poolTx > dbTx+uint64(pending):
		return false, fmt.Sprintf("the pool's transaction id is %d but the database recorded %d with %d operations pending (a re-created pool, or someone else's)", poolTx, dbTx, pending)
	}
	return false, ""
}

// checkOwnership makes sure the pool is the one this database manages
// (poolOwnership), records a new pool, and adopts a mismatched one when
// allow_adopt is set.
func (s *Snapshotter) checkOwnership(ctx context.Context) error {
	name := s.pool.Name()
	st, err := s.pool.Status()
	if err != nil {
		return fmt.Errorf("status of pool %s: %w", name, err)
	}
	if st.Fail || st.Error {
		return fmt.Errorf("pool %s has failed (status Fail/Error): run thin_check on its metadata: %w", name, errdefs.ErrFailedPrecondition)
	}
	var (
		pi      storage.PoolInfo
		dbTx    uint64
		pending int
	)
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		if pi, err = tx.PoolInfo(); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if dbTx, err = tx.TransactionID(); err != nil {
			return err
		}
		entries, err := tx.Journal()
		pending = len(entries)
		return err
	}); err != nil {
		return err
	}

	isNew, mismatch := poolOwnership(pi, dbTx, pending, poolNames(s.pool), st.TransactionID)
	if mismatch != "" && !s.cfg.AllowAdopt {
		return fmt.Errorf("pool %s: %s; refusing to use it (set allow_adopt = true under [pool] to take it over): %w", name, mismatch, errdefs.ErrFailedPrecondition)
	}
	if mismatch != "" {
		log.G(ctx).WithField("pool", name).Warnf("adopting pool: %s", mismatch)
	}
	if isNew || mismatch != "" {
		if pi.Name == "" {
			pi.Created = time.Now().UTC()
		}
		pi.Name = name
		if err := s.db.Update(ctx, func(tx *storage.Tx) error {
			if err := tx.SetPoolInfo(pi); err != nil {
				return err
			}
			return tx.SetTransactionID(st.TransactionID)
		}); err != nil {
			return err
		}
	}
	s.txid = st.TransactionID
	s.recordedPool = pi.Name
	return nil
}

// poolNames are the names a database may have recorded for pool: an LVM
// pool's dm name changes when LVM thin volumes come or go, and a database
// made with either one keeps it.
func poolNames(pool thinPool) []string {
	if a, ok := pool.(interface{ Aliases() []string }); ok {
		return a.Aliases()
	}
	return []string{pool.Name()}
}

// raiseTxID records the pool's transaction id in tx; operations finish out
// of order, so it only moves forward.
func raiseTxID(tx *storage.Tx, id uint64) error {
	cur, err := tx.TransactionID()
	if err != nil || cur >= id {
		return err
	}
	return tx.SetTransactionID(id)
}
