package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// Values are stored in a small hand-written binary format: fixed-order
// fields as varints and length-prefixed strings, a few times smaller than
// JSON and cheaper to decode. Records carry no version of their own: the
// database's schema version (schema.go) says how all of them are encoded,
// and a migration rewrites them when it changes.

// errCorrupt is wrapped by every decoding error so callers can tell a broken
// database from a missing record.
var errCorrupt = errors.New("corrupt record")

type encoder struct{ b []byte }

func (e *encoder) byte(v byte)             { e.b = append(e.b, v) }
func (e *encoder) uvarint(v uint64)        { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) varint(v int64)          { e.b = binary.AppendVarint(e.b, v) }
func (e *encoder) string(v string)         { e.uvarint(uint64(len(v))); e.b = append(e.b, v...) }
func (e *encoder) time(t time.Time)        { e.varint(t.Unix()); e.uvarint(uint64(t.Nanosecond())) }
func (e *encoder) usage(u snapshots.Usage) { e.varint(u.Size); e.varint(u.Inodes) }

func (e *encoder) bool(v bool) {
	if v {
		e.byte(1)
		return
	}
	e.byte(0)
}

// decoder reads fields in order; the first failure sticks so callers check
// err once at the end.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: truncated or invalid %s", errCorrupt, what)
	}
}

func (d *decoder) byte(what string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 1 {
		d.fail(what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint32(what string) uint32 {
	v := d.uvarint(what)
	if v > math.MaxUint32 {
		d.fail(what)
		return 0
	}
	return uint32(v)
}

func (d *decoder) raw(what string) []byte {
	n := d.uvarint(what)
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.fail(what)
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

// string copies, as it must: bbolt memory is only valid inside the
// transaction.
func (d *decoder) string(what string) string { return string(d.raw(what)) }

func (d *decoder) time(what string) time.Time {
	sec := d.varint(what)
	nsec := d.uvarint(what)
	if d.err != nil {
		return time.Time{}
	}
	if nsec >= uint64(time.Second) {
		d.fail(what)
		return time.Time{}
	}
	return time.Unix(sec, int64(nsec)).UTC()
}

// bool reads a byte that must be 0 or 1.
func (d *decoder) bool(what string) bool {
	switch d.byte(what) {
	case 0:
		return false
	case 1:
		return true
	}
	d.fail(what)
	return false
}

func (d *decoder) usage(what string) snapshots.Usage {
	return snapshots.Usage{Size: d.varint(what), Inodes: d.varint(what)}
}

func (d *decoder) finish(what string) error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes in %s", errCorrupt, len(d.b), what)
	}
	if d.err != nil {
		return fmt.Errorf("%w: %w", d.err, errdefs.ErrDataLoss)
	}
	return nil
}

// encodeSnapshot encodes everything but the key, which is the bbolt key.
func encodeSnapshot(s *Snapshot) []byte {
	e := encoder{b: make([]byte, 0, 48+len(s.Parent)+len(s.FSType)+labelsSize(s.Labels))}
	e.byte(byte(s.Kind))
	e.byte(byte(s.State))
	e.uvarint(uint64(s.DeviceID))
	e.uvarint(s.Size)
	e.time(s.Created)
	e.time(s.Updated)
	e.usage(s.Usage)
	e.string(s.Parent)
	e.string(s.FSType)
	e.uvarint(uint64(len(s.Labels)))
	// Map order is random; the byte image need not be stable, only decodable.
	for k, v := range s.Labels {
		e.string(k)
		e.string(v)
	}
	e.uvarint(s.Shared)
	e.uvarint(uint64(s.CommitID))
	return e.b
}

func labelsSize(l map[string]string) int {
	n := 0
	for k, v := range l {
		n += len(k) + len(v) + 4
	}
	return n
}

func decodeSnapshot(key string, b []byte) (Snapshot, error) {
	d := decoder{b: b}
	s := Snapshot{Key: key}
	s.Kind = snapshots.Kind(d.byte("kind"))
	s.State = State(d.byte("state"))
	s.DeviceID = d.uint32("device id")
	s.Size = d.uvarint("size")
	s.Created = d.time("created")
	s.Updated = d.time("updated")
	s.Usage = d.usage("usage")
	s.Parent = d.string("parent")
	s.FSType = d.string("fs type")
	n := d.uvarint("label count")
	// Each label takes at least two bytes; refuse counts the input cannot
	// hold before allocating for them.
	if d.err == nil && n > uint64(len(d.b))/2 {
		d.fail("label count")
	}
	if d.err == nil && n > 0 {
		s.Labels = make(map[string]string, n)
		for i := uint64(0); i < n && d.err == nil; i++ {
			k := d.string("label key")
			s.Labels[k] = d.string("label value")
		}
	}
	s.Shared = d.uvarint("shared")
	s.CommitID = d.uint32("commit id")
	if d.err == nil && !validKind(s.Kind) {
		d.err = fmt.Errorf("%w: invalid kind %d", errCorrupt, s.Kind)
	}
	if d.err == nil && !s.State.valid() {
		d.err = fmt.Errorf("%w: invalid state %d", errCorrupt, s.State)
	}
	if d.err == nil && (s.DeviceID > MaxDeviceID || s.CommitID > MaxDeviceID) {
		d.err = fmt.Errorf("%w: device id %d or commit id %d out of range", errCorrupt, s.DeviceID, s.CommitID)
	}
	if err := d.finish("snapshot " + key); err != nil {
		return Snapshot{}, err
	}
	return s, nil
}

func validKind(k snapshots.Kind) bool {
	switch k {
	case snapshots.KindView, snapshots.KindActive, snapshots.KindCommitted:
		return true
	}
	return false
}

func encodeEntry(en *Entry) []byte {
	e := encoder{b: make([]byte, 0, 40+len(en.Key)+len(en.Name))}
	e.byte(byte(en.Op))
	e.uvarint(uint64(en.DeviceID))
	e.uvarint(uint64(en.OriginID))
	e.uvarint(en.Size)
	e.time(en.Created)
	e.string(en.Key)
	e.string(en.Name)
	return e.b
}

func decodeEntry(seq uint64, b []byte) (Entry, error) {
	d := decoder{b: b}
	en := Entry{Seq: seq}
	en.Op = Op(d.byte("op"))
	en.DeviceID = d.uint32("device id")
	en.OriginID = d.uint32("origin id")
	en.Size = d.uvarint("size")
	en.Created = d.time("created")
	en.Key = d.string("key")
	en.Name = d.string("name")
	if d.err == nil && !en.Op.valid() {
		d.err = fmt.Errorf("%w: unknown %s", errCorrupt, en.Op)
	}
	if err := d.finish(fmt.Sprintf("journal entry %d", seq)); err != nil {
		return Entry{}, err
	}
	return en, nil
}

// encodeWarm encodes everything but the device id, which is the bbolt key.
func encodeWarm(w *Warm) []byte {
	e := encoder{b: make([]byte, 0, 24+len(w.Parent))}
	e.string(w.Parent)
	e.uvarint(uint64(w.OriginID))
	e.uvarint(w.Size)
	e.time(w.Created)
	return e.b
}

func decodeWarm(id uint32, b []byte) (Warm, error) {
	d := decoder{b: b}
	w := Warm{DeviceID: id}
	w.Parent = d.string("parent")
	w.OriginID = d.uint32("origin id")
	w.Size = d.uvarint("size")
	w.Created = d.time("created")
	if d.err == nil && (id == 0 || id > MaxDeviceID) {
		d.err = fmt.Errorf("%w: device id %d out of range", errCorrupt, id)
	}
	if err := d.finish(fmt.Sprintf("warm device %d", id)); err != nil {
		return Warm{}, err
	}
	return w, nil
}

func encodePoolInfo(p *PoolInfo) []byte {
	e := encoder{}
	e.string(p.Name)
	e.time(p.Created)
	e.uvarint(uint64(p.BaseDeviceID))
	e.uvarint(p.BaseSize)
	e.string(p.BaseFSType)
	e.bool(p.IDsScanned)
	return e.b
}

func decodePoolInfo(b []byte) (PoolInfo, error) {
	d := decoder{b: b}
	var p PoolInfo
	p.Name = d.string("name")
	p.Created = d.time("created")
	p.BaseDeviceID = d.uint32("base device id")
	p.BaseSize = d.uvarint("base size")
	p.BaseFSType = d.string("base fs type")
	p.IDsScanned = d.bool("ids scanned")
	if err := d.finish("pool info"); err != nil {
		return PoolInfo{}, err
	}
	return p, nil
}

// childKey indexes child under parent. The parent is length-prefixed so a
// prefix scan for one parent never matches another parent whose name merely
// starts with the same bytes.
func childKey(parent, child string) []byte {
	b := make([]byte, 0, binary.MaxVarintLen64+len(parent)+len(child))
	b = binary.AppendUvarint(b, uint64(len(parent)))
	b = append(b, parent...)
	return append(b, child...)
}

func childPrefix(parent string) []byte {
	b := make([]byte, 0, binary.MaxVarintLen64+len(parent))
	b = binary.AppendUvarint(b, uint64(len(parent)))
	return append(b, parent...)
}

func idKey(id uint32) []byte {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], id)
	return b[:]
}

func u64Key(v uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return b[:]
}
