package snapshotter

import (
	"errors"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolStep makes one change to the pool's metadata and moves the pool's
// transaction id one step to record it:
//   - journal (may be nil) records the intent in the database; its error
//     ends the step before the pool is touched. It runs before poolMu is
//     taken, so one call's database commit (an fsync) overlaps another's
//     pool messages;
//   - under poolMu, so steps never interleave, change sends the pool
//     message and the pool's transaction id moves to next; when the pool
//     refuses, undo (may be nil) takes the change out again so pool and
//     journal agree.
//
// txSet reports whether the pool is at next; the caller records next in the
// database with raiseTxID once its outcome is recorded too. Every journaled
// step moves the pool at most one ahead, so the pool is never further ahead
// of the database than its pending entries (poolOwnership).
func (s *Snapshotter) poolStep(journal, change, undo func() error) (next uint64, txSet bool, err error) {
	if journal != nil {
		if err := journal(); err != nil {
			return 0, false, err
		}
	}
	s.poolMu.Lock()
	defer s.poolMu.Unlock()
	return s.poolStepLocked(nil, change, undo)
}

// poolStepLocked is poolStep with journal run under poolMu too, for a
// journal that reads a device nothing else keeps from deletion (removals
// delete under poolMu). Called with poolMu held.
func (s *Snapshotter) poolStepLocked(journal, change, undo func() error) (next uint64, txSet bool, err error) {
	if journal != nil {
		if err := journal(); err != nil {
			return 0, false, err
		}
	}
	next = s.txid + 1
	if err := change(); err != nil {
		return next, false, err
	}
	if err := s.pool.SetTransactionID(s.txid, next); err != nil {
		if undo != nil {
			err = errors.Join(err, undo())
		}
		return next, false, err
	}
	s.txid = next
	return next, true, nil
}

// raiseTxID records the pool's transaction id; operations finish out of
// order, so it only moves forward.
func (s *Snapshotter) raiseTxID(tx *storage.Tx, id uint64) error {
	cur, err := tx.TransactionID()
	if err != nil || cur >= id {
		return err
	}
	return tx.SetTransactionID(id)
}
