package storage

import (
	"encoding/binary"
	"fmt"

	"github.com/containerd/errdefs"
)

// MaxDeviceID is the largest thin device id: the pool's ids are 24 bits.
// Id 0 is never handed out.
const MaxDeviceID uint32 = 1<<24 - 1

// Allocation state: ids below the high-water mark (meta next-id) are either
// in ids-used or in ids-free, never both; ids at or above it are in ids-used
// only if ReserveID took them. Allocation prefers the lowest released id
// (first key of ids-free) and otherwise advances the mark past reserved ids,
// so each call costs a few B-tree lookups, amortized.

// Values in ids-used and ids-free start with a marker byte because bbolt
// does not reliably tell an empty value from a missing key.
const idMarker = 1

func ownerValue(owner string) []byte {
	b := make([]byte, 1, 1+len(owner))
	b[0] = idMarker
	return append(b, owner...)
}

func checkID(id uint32) error {
	if id == 0 || id > MaxDeviceID {
		return fmt.Errorf("device id %d outside 1..%d: %w", id, MaxDeviceID, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (tx *Tx) idOwner(id uint32) (owner string, used bool) {
	v := tx.used.Get(idKey(id))
	if len(v) == 0 {
		return "", false
	}
	return string(v[1:]), true
}

func (tx *Tx) nextID() (uint32, error) {
	v := tx.meta.Get(metaNextID)
	if v == nil {
		return 1, nil
	}
	if len(v) != 4 {
		return 0, fmt.Errorf("%w: next device id has %d bytes: %w", errCorrupt, len(v), errdefs.ErrDataLoss)
	}
	return binary.BigEndian.Uint32(v), nil
}

// AllocateID hands out a free thin device id: the lowest released one, or
// else the next never-used one. ResourceExhausted when all 2^24-1 ids are in
// use.
func (tx *Tx) AllocateID() (uint32, error) {
	if err := tx.checkWritable(); err != nil {
		return 0, err
	}
	if k, _ := tx.free.Cursor().First(); k != nil {
		if len(k) != 4 {
			return 0, fmt.Errorf("%w: free id key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
		}
		id := binary.BigEndian.Uint32(k)
		if err := tx.free.Delete(k); err != nil {
			return 0, fmt.Errorf("take free id %d: %w", id, err)
		}
		return id, tx.markUsed(id)
	}
	next, err := tx.nextID()
	if err != nil {
		return 0, err
	}
	// Skip ids that ReserveID took above the mark.
	for next <= MaxDeviceID {
		if _, used := tx.idOwner(next); !used {
			break
		}
		next++
	}
	if next > MaxDeviceID || next == 0 {
		return 0, fmt.Errorf("all %d thin device ids are in use: %w", MaxDeviceID, errdefs.ErrResourceExhausted)
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], next+1)
	if err := tx.meta.Put(metaNextID, b[:]); err != nil {
		return 0, fmt.Errorf("advance device id mark: %w", err)
	}
	return next, tx.markUsed(next)
}

func (tx *Tx) markUsed(id uint32) error {
	if err := tx.used.Put(idKey(id), ownerValue("")); err != nil {
		return fmt.Errorf("mark device id %d used: %w", id, err)
	}
	return nil
}

// ReserveID marks a specific id as in use, e.g. the base device's or one
// found in the pool during recovery. AlreadyExists if it is in use.
func (tx *Tx) ReserveID(id uint32) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkID(id); err != nil {
		return err
	}
	if _, used := tx.idOwner(id); used {
		return fmt.Errorf("device id %d: %w", id, errdefs.ErrAlreadyExists)
	}
	if err := tx.free.Delete(idKey(id)); err != nil {
		return fmt.Errorf("take free id %d: %w", id, err)
	}
	return tx.markUsed(id)
}

// ReleaseID makes an id available again. Call it only once the pool has
// confirmed the device is deleted. NotFound if the id is not in use,
// FailedPrecondition if a snapshot record still owns it.
func (tx *Tx) ReleaseID(id uint32) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkID(id); err != nil {
		return err
	}
	owner, used := tx.idOwner(id)
	if !used {
		return fmt.Errorf("device id %d is not in use: %w", id, errdefs.ErrNotFound)
	}
	if owner != "" {
		return fmt.Errorf("device id %d is still owned by snapshot %q: %w", id, owner, errdefs.ErrFailedPrecondition)
	}
	if tx.isForeign(id) {
		return fmt.Errorf("device id %d is foreign (the pool had it before us); unmark it first: %w", id, errdefs.ErrFailedPrecondition)
	}
	if err := tx.used.Delete(idKey(id)); err != nil {
		return fmt.Errorf("release device id %d: %w", id, err)
	}
	next, err := tx.nextID()
	if err != nil {
		return err
	}
	// Ids at or above the mark are handed out by advancing it; listing
	// them as free too would hand them out twice.
	if id < next {
		if err := tx.free.Put(idKey(id), []byte{idMarker}); err != nil {
			return fmt.Errorf("free device id %d: %w", id, err)
		}
	}
	return nil
}

// IDInUse reports whether id is allocated or reserved.
func (tx *Tx) IDInUse(id uint32) (bool, error) {
	if err := checkID(id); err != nil {
		return false, err
	}
	_, used := tx.idOwner(id)
	return used, nil
}

// WalkIDs calls fn for every id in use, in ascending order, with its owning
// snapshot key or "". Recovery uses it to find ids whose device was never
// attached to a record.
func (tx *Tx) WalkIDs(fn func(id uint32, owner string) error) error {
	c := tx.used.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(k) != 4 || len(v) == 0 || v[0] != idMarker {
			return fmt.Errorf("%w: bad used id entry %x: %w", errCorrupt, k, errdefs.ErrDataLoss)
		}
		if err := fn(binary.BigEndian.Uint32(k), string(v[1:])); err != nil {
			return err
		}
	}
	return nil
}

// claimID attaches an allocated, unowned id to the record key.
func (tx *Tx) claimID(id uint32, key string) error {
	owner, used := tx.idOwner(id)
	if !used {
		return fmt.Errorf("device id %d is not allocated: %w", id, errdefs.ErrFailedPrecondition)
	}
	if owner != "" {
		return fmt.Errorf("device id %d is already owned by snapshot %q: %w", id, owner, errdefs.ErrFailedPrecondition)
	}
	if err := tx.used.Put(idKey(id), ownerValue(key)); err != nil {
		return fmt.Errorf("attach device id %d to %q: %w", id, key, err)
	}
	return nil
}

// Foreign ids: thin ids the pool already had when we tried to create a
// device with them (someone else's device, or one of ours the database
// lost). They stay allocated without owner, so AllocateID never hands them
// out again, and are listed in ids-foreign so that neither recovery nor a
// repair takes them for our own leaked ids or orphans.

func (tx *Tx) isForeign(id uint32) bool { return tx.foreign.Get(idKey(id)) != nil }

// MarkForeign records id as foreign. The id must be unowned: allocated for
// the create that found it taken, or not in use at all (then it is
// reserved). Marking a foreign id again is a no-op.
func (tx *Tx) MarkForeign(id uint32) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkID(id); err != nil {
		return err
	}
	owner, used := tx.idOwner(id)
	switch {
	case owner != "":
		return fmt.Errorf("device id %d is owned by snapshot %q: %w", id, owner, errdefs.ErrFailedPrecondition)
	case !used:
		if err := tx.ReserveID(id); err != nil {
			return err
		}
	}
	if err := tx.foreign.Put(idKey(id), []byte{idMarker}); err != nil {
		return fmt.Errorf("mark device id %d foreign: %w", id, err)
	}
	return nil
}

// UnmarkForeign takes the foreign mark off id; it stays allocated without
// owner until ReleaseID. NotFound if id is not foreign.
func (tx *Tx) UnmarkForeign(id uint32) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkID(id); err != nil {
		return err
	}
	if !tx.isForeign(id) {
		return fmt.Errorf("device id %d is not foreign: %w", id, errdefs.ErrNotFound)
	}
	if err := tx.foreign.Delete(idKey(id)); err != nil {
		return fmt.Errorf("unmark foreign device id %d: %w", id, err)
	}
	return nil
}

// ForeignIDs returns the foreign ids, ascending.
func (tx *Tx) ForeignIDs() ([]uint32, error) {
	var out []uint32
	c := tx.foreign.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		if len(k) != 4 {
			return nil, fmt.Errorf("%w: foreign id key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
		}
		out = append(out, binary.BigEndian.Uint32(k))
	}
	return out, nil
}
