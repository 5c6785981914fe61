package storage

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// Op names a pool operation recorded in the journal. Values are stored as
// one byte and are never reused: 4, 5 and 7 belonged to operations schema 1
// named but nothing ever journaled; 9 marked a warm device in schema 4,
// before warm devices got a bucket of their own (Warm).
type Op uint8

// The operations the snapshotter journals.
const (
	OpCreateThin Op = 1 // create thin device DeviceID of Size bytes
	OpCreateSnap Op = 2 // snapshot OriginID into DeviceID
	// OpDelete deletes thin device DeviceID. A non-zero OriginID names a
	// device that held all of DeviceID's blocks when it was journaled (a
	// view's or a warm device's origin, never written since): its blocks
	// need no discard of their own.
	OpDelete Op = 3
	OpCommit Op = 6 // commit active Key as Name on DeviceID (schema 2)
	// OpCommitSnap commits active Key as Name: DeviceID, the committed
	// snapshot's new device, is a snapshot of OriginID, the active's.
	OpCommitSnap Op = 8
)

var opNames = map[Op]string{
	OpCreateThin: "create_thin",
	OpCreateSnap: "create_snap",
	OpDelete:     "delete",
	OpCommit:     "commit",
	OpCommitSnap: "commit_snap",
}

func (o Op) valid() bool { _, ok := opNames[o]; return ok }

func (o Op) String() string {
	if n, ok := opNames[o]; ok {
		return n
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Entry is one intent in the pool journal: written before the pool is
// touched, in the same transaction as the record changes, and removed by
// FinishJournal when the operation has finished or been rolled back.
type Entry struct {
	Seq      uint64 // assigned by AddJournal, increasing
	Op       Op
	DeviceID uint32
	OriginID uint32 // source device of OpCreateSnap (see the ops)
	Key      string // snapshot key concerned
	Name     string // second key, e.g. the committed name of OpCommit
	Size     uint64 // bytes, e.g. of OpCreateThin
	Created  time.Time
}

func (e Entry) String() string {
	return fmt.Sprintf("#%d %s id=%d origin=%d key=%q name=%q", e.Seq, e.Op, e.DeviceID, e.OriginID, e.Key, e.Name)
}

// AddJournal appends e (Seq is ignored, Created defaults to now) and
// returns its sequence number.
func (tx *Tx) AddJournal(e Entry) (uint64, error) {
	if err := tx.checkWritable(); err != nil {
		return 0, err
	}
	if !e.Op.valid() {
		return 0, fmt.Errorf("journal entry with unknown %s: %w", e.Op, errdefs.ErrInvalidArgument)
	}
	if e.DeviceID > MaxDeviceID || e.OriginID > MaxDeviceID {
		return 0, fmt.Errorf("journal entry device id out of range: %w", errdefs.ErrInvalidArgument)
	}
	seq, err := tx.journal.NextSequence()
	if err != nil {
		return 0, fmt.Errorf("journal sequence: %w", err)
	}
	e.Seq = seq
	if e.Created.IsZero() {
		e.Created = tx.now().UTC()
	}
	if err := tx.journal.Put(u64Key(seq), encodeEntry(&e)); err != nil {
		return 0, fmt.Errorf("write journal entry %d: %w", seq, err)
	}
	return seq, nil
}

// Journal returns the pending entries, oldest first.
func (tx *Tx) Journal() ([]Entry, error) {
	var out []Entry
	c := tx.journal.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(k) != 8 {
			return nil, fmt.Errorf("%w: journal key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
		}
		e, err := decodeEntry(binary.BigEndian.Uint64(k), v)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// GetJournal returns the pending entry seq, or NotFound.
func (tx *Tx) GetJournal(seq uint64) (Entry, error) {
	v := tx.journal.Get(u64Key(seq))
	if v == nil {
		return Entry{}, fmt.Errorf("journal entry %d: %w", seq, errdefs.ErrNotFound)
	}
	return decodeEntry(seq, v)
}

// FinishJournal removes the entry seq; NotFound if it is not pending.
func (tx *Tx) FinishJournal(seq uint64) error {
	if err := tx.checkWritable(); err != nil {
		return err
	}
	k := u64Key(seq)
	if tx.journal.Get(k) == nil {
		return fmt.Errorf("journal entry %d: %w", seq, errdefs.ErrNotFound)
	}
	if err := tx.journal.Delete(k); err != nil {
		return fmt.Errorf("finish journal entry %d: %w", seq, err)
	}
	return nil
}
