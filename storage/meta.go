package storage

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// PoolInfo identifies the thin pool the database describes, so a daemon
// pointed at the wrong pool or root can notice, and names the base device
// every new snapshot chain starts from.
type PoolInfo struct {
	Name         string    // dm name of the pool
	Created      time.Time // when the database was first tied to the pool
	BaseDeviceID uint32    // thin id of the base (empty filesystem) device
	BaseSize     uint64    // bytes
	BaseFSType   string
	// IDsScanned says the pool's thin ids were listed (a metadata
	// snapshot) and every one the database did not hold was marked
	// foreign. Then a device at an id the database handed out is its
	// own: recovery may delete it.
	IDsScanned bool
}

// TransactionID returns the pool transaction id last stored (0 initially).
func (tx *Tx) TransactionID() (uint64, error) {
	v := tx.meta.Get(metaTxID)
	if v == nil {
		return 0, nil
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("%w: transaction id has %d bytes: %w", errCorrupt, len(v), errdefs.ErrDataLoss)
	}
	return binary.BigEndian.Uint64(v), nil
}

// SetTransactionID stores the pool transaction id.
func (tx *Tx) SetTransactionID(id uint64) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	return tx.meta.Put(metaTxID, u64Key(id))
}

// PoolInfo returns the stored pool identity, or NotFound.
func (tx *Tx) PoolInfo() (PoolInfo, error) {
	v := tx.meta.Get(metaPool)
	if v == nil {
		return PoolInfo{}, fmt.Errorf("pool info: %w", errdefs.ErrNotFound)
	}
	return decodePoolInfo(v)
}

// SetPoolInfo stores the pool identity.
func (tx *Tx) SetPoolInfo(p PoolInfo) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	return tx.meta.Put(metaPool, encodePoolInfo(&p))
}

// CleanStop reports whether the last process that served the database
// said it stopped cleanly (SetCleanStop), rather than crashing.
func (tx *Tx) CleanStop() bool { return tx.meta.Get(metaClean) != nil }

// SetCleanStop records whether the serving process stopped cleanly: true
// as its last write, false as its first.
func (tx *Tx) SetCleanStop(clean bool) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if clean {
		return tx.meta.Put(metaClean, []byte{idMarker})
	}
	return tx.meta.Delete(metaClean)
}
