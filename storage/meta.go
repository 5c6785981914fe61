package storage

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// PoolInfo identifies the thin pool the database describes, so a daemon
// pointed at the wrong pool or root can notice.
type PoolInfo struct {
	Name           string // dm name of the pool
	DataDevice     string
	MetadataDevice string
	BlockSectors   uint32 // data block size in 512-byte sectors
	Created        time.Time
	BaseDeviceID   uint32 // thin id of the base (empty filesystem) device
	BaseSize       uint64 // bytes
	BaseFSType     string
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

// Meta returns a copy of the value the snapshotter stored under key, or
// NotFound.
func (tx *Tx) Meta(key string) ([]byte, error) {
	if key == "" {
		return nil, fmt.Errorf("empty meta key: %w", errdefs.ErrInvalidArgument)
	}
	v := tx.kv.Get([]byte(key))
	if len(v) == 0 {
		return nil, fmt.Errorf("meta %q: %w", key, errdefs.ErrNotFound)
	}
	// Values carry a marker byte, see ownerValue.
	if v[0] != idMarker {
		return nil, fmt.Errorf("%w: meta %q has no marker: %w", errCorrupt, key, errdefs.ErrDataLoss)
	}
	return append([]byte{}, v[1:]...), nil
}

// SetMeta stores value under key for the snapshotter's own use.
func (tx *Tx) SetMeta(key string, value []byte) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkKey("meta key", key); err != nil {
		return err
	}
	v := make([]byte, 1, 1+len(value))
	v[0] = idMarker
	return tx.kv.Put([]byte(key), append(v, value...))
}

// DeleteMeta removes key; removing a missing key is not an error.
func (tx *Tx) DeleteMeta(key string) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if key == "" {
		return fmt.Errorf("empty meta key: %w", errdefs.ErrInvalidArgument)
	}
	return tx.kv.Delete([]byte(key))
}
