package storage

import (
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/errdefs"
)

// Warm is a thin device made ahead of time for the next child of a
// committed snapshot. It holds exactly the committed snapshot's content,
// stays active, and no client sees it until a Prepare takes it. Warm
// devices are kept apart from the journal: they are not operations in
// flight, and after a crash the snapshotter deletes them.
type Warm struct {
	DeviceID uint32 // an allocated id without an owner
	Parent   string // key of the committed snapshot it was made from
	// OriginID is Parent's device when the warm device was made; 0 when
	// unknown (the device may then be the last to hold its blocks).
	OriginID uint32
	Size     uint64 // virtual size in bytes
	Created  time.Time
}

// AddWarm records w (Created defaults to now). Its device id must be
// allocated and unowned. AlreadyExists when the id is warm already.
func (tx *Tx) AddWarm(w Warm) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	if err := checkID(w.DeviceID); err != nil {
		return err
	}
	if err := checkKey("warm device parent", w.Parent); err != nil {
		return err
	}
	if w.OriginID > MaxDeviceID {
		return fmt.Errorf("warm device %d: origin id %d out of range: %w", w.DeviceID, w.OriginID, errdefs.ErrInvalidArgument)
	}
	switch owner, used := tx.idOwner(w.DeviceID); {
	case !used:
		return fmt.Errorf("warm device %d: id is not allocated: %w", w.DeviceID, errdefs.ErrFailedPrecondition)
	case owner != "":
		return fmt.Errorf("warm device %d: id is owned by snapshot %q: %w", w.DeviceID, owner, errdefs.ErrFailedPrecondition)
	}
	if tx.warm.Get(idKey(w.DeviceID)) != nil {
		return fmt.Errorf("warm device %d: %w", w.DeviceID, errdefs.ErrAlreadyExists)
	}
	if w.Created.IsZero() {
		w.Created = tx.now().UTC()
	}
	if err := tx.warm.Put(idKey(w.DeviceID), encodeWarm(&w)); err != nil {
		return fmt.Errorf("write warm device %d: %w", w.DeviceID, err)
	}
	return nil
}

// WarmDevices returns the warm devices, oldest first.
func (tx *Tx) WarmDevices() ([]Warm, error) {
	var out []Warm
	c := tx.warm.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(k) != 4 {
			return nil, fmt.Errorf("%w: warm device key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
		}
		w, err := decodeWarm(binary.BigEndian.Uint32(k), v)
		if err != nil {
			return nil, err
		}
		out = append(out, w)
	}
	slices.SortStableFunc(out, func(a, b Warm) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// RemoveWarm deletes the warm record of device id and returns it; the id
// stays allocated. NotFound when id is not warm.
func (tx *Tx) RemoveWarm(id uint32) (Warm, error) {
	if err := tx.checkWritable(); err != nil {
		return Warm{}, err
	}
	k := idKey(id)
	v := tx.warm.Get(k)
	if v == nil {
		return Warm{}, fmt.Errorf("warm device %d: %w", id, errdefs.ErrNotFound)
	}
	w, err := decodeWarm(id, v)
	if err != nil {
		return Warm{}, err
	}
	if err := tx.warm.Delete(k); err != nil {
		return Warm{}, fmt.Errorf("delete warm device %d: %w", id, err)
	}
	return w, nil
}
