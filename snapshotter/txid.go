package snapshotter

import (
	"errors"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// poolStep makes one change to the pool's metadata and moves the pool's
// transaction id one step to record it. Only the steps that set the pool
// up (the base device) take it; the others are poolChanges. The id marks
// the pool as the database's: a re-created pool (id 0) is told apart.
//   - journal (may be nil) records the intent in the database; its error
//     ends the step before the pool is touched;
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

// poolChange is one change to the pool's metadata that leaves the pool's
// transaction id alone: journal (may be nil) records the intent first, then
// change sends the pool message under poolMu. journal runs before poolMu is
// taken, so one call's database commit (an fsync) overlaps another's pool
// messages. The message commits the pool's metadata itself, and recovery
// settles an interrupted change from its journal entry alone (it deletes an
// unfinished create's id, ENODATA when the pool never made it, and finishes
// a delete): a set_transaction_id per change would cost a second metadata
// commit (5-7 ms in the VM bench on a file-backed pool) and prove nothing.
func (s *Snapshotter) poolChange(journal, change func() error) error {
	if journal != nil {
		if err := journal(); err != nil {
			return err
		}
	}
	s.poolMu.Lock()
	defer s.poolMu.Unlock()
	return change()
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
