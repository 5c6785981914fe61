package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// The layout of the database is versioned as a whole: meta/schema holds the
// version that wrote it. Open brings an older database up to date in the
// same write transaction that checks it, one migration per version, so a
// failed migration leaves the file as it was; a newer database is refused
// (FailedPrecondition) rather than guessed at.
//
// Version 1 is the layout of commit 75866ef and before: every record led by
// a format byte of 1, journal entries with a trailing Data field, pool info
// with data device, metadata device and block size, and a "kv" bucket for
// SetMeta. Version 2 drops what nothing ever set or read: records have no
// format byte (the schema version alone says how they are encoded), entries
// no Data, pool info only the fields the snapshotter sets, and there is no
// kv bucket. Version 3 adds the ids-foreign bucket: thin ids the pool
// already had when we tried to create them, kept in ids-used so they are
// never handed out again. Version 4 adds journal ops 8 (commit_snap) and 9
// (warm, a device made ahead that stays in the journal until handed out);
// the layout is the same, so the migration only says a version 3 program
// must not open the file, as it would refuse those entries. Version 5 moves
// warm devices out of the journal into a bucket of their own (warm), so
// the journal holds only operations in flight, drops the transaction id
// field of journal entries, which nothing ever set, and adds
// PoolInfo.IDsScanned (false: a version 4 database never listed the
// pool's ids) and Snapshot.CommitID (0: none reserved).
const schemaVersion uint32 = 5

// migration upgrades a database from one schema version to the next inside
// Open's write transaction.
type migration func(tx *bolt.Tx) error

// migrations[v-1] upgrades version v to v+1.
var migrations = []migration{migrateSchema1, migrateSchema2, migrateSchema3, migrateSchema4}

func initSchema(tx *bolt.Tx, want uint32, migs []migration) error {
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		// A fresh file; a non-empty file without our meta bucket is
		// someone else's database and must not be adopted.
		empty := true
		_ = tx.ForEach(func([]byte, *bolt.Bucket) error { empty = false; return nil })
		if !empty {
			return fmt.Errorf("not a thin-snapshotter database (no meta bucket): %w", errdefs.ErrFailedPrecondition)
		}
		for _, name := range allBuckets {
			if _, err := tx.CreateBucket(name); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		return putSchema(tx, want)
	}
	raw := meta.Get(metaSchema)
	if len(raw) != 4 {
		return fmt.Errorf("%w: schema version missing: %w", errCorrupt, errdefs.ErrDataLoss)
	}
	have := binary.BigEndian.Uint32(raw)
	if have > want {
		return fmt.Errorf("database schema version %d is newer than version %d, the newest this program knows; use a newer thin-snapshotter: %w",
			have, want, errdefs.ErrFailedPrecondition)
	}
	for v := have; v < want; v++ {
		if v == 0 || int(v) > len(migs) || migs[v-1] == nil {
			return fmt.Errorf("no migration from schema version %d to %d: %w", v, v+1, errdefs.ErrFailedPrecondition)
		}
		if err := migs[v-1](tx); err != nil {
			return fmt.Errorf("migrate schema %d to %d: %w", v, v+1, err)
		}
	}
	// Buckets a version adds are created by its migration, so any gap
	// here is damage, not something to paper over.
	for _, name := range allBuckets {
		if tx.Bucket(name) == nil {
			return fmt.Errorf("%w: bucket %s missing: %w", errCorrupt, name, errdefs.ErrDataLoss)
		}
	}
	if have != want {
		return putSchema(tx, want)
	}
	return nil
}

func putSchema(tx *bolt.Tx, v uint32) error {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return tx.Bucket(bucketMeta).Put(metaSchema, b[:])
}

// migrateSchema1 rewrites a version 1 database as version 2. It reads the
// old records with the decoder's primitives rather than today's record
// decoders, so it stays right when a later version changes those. What
// version 2 drops must be empty: nothing ever wrote it, so a value there
// came from a writer this code does not know, and refusing keeps it for the
// version that does.
func migrateSchema1(tx *bolt.Tx) error {
	kvName := []byte("kv")
	if kv := tx.Bucket(kvName); kv != nil {
		if k, _ := kv.Cursor().First(); k != nil {
			return fmt.Errorf("schema 1 kv bucket holds key %q, which schema 2 has no place for: %w", k, errdefs.ErrFailedPrecondition)
		}
		if err := tx.DeleteBucket(kvName); err != nil {
			return fmt.Errorf("delete kv bucket: %w", err)
		}
	}
	if err := rewriteBucket(tx, bucketSnapshots, snapshotFromV1); err != nil {
		return err
	}
	if err := rewriteBucket(tx, bucketJournal, entryFromV1); err != nil {
		return err
	}
	meta := tx.Bucket(bucketMeta)
	if v := meta.Get(metaPool); v != nil {
		p, err := poolInfoFromV1(v)
		if err != nil {
			return err
		}
		if err := meta.Put(metaPool, p); err != nil {
			return fmt.Errorf("write pool info: %w", err)
		}
	}
	return nil
}

// migrateSchema2 adds the ids-foreign bucket; nothing else changes.
func migrateSchema2(tx *bolt.Tx) error {
	if tx.Bucket(bucketForeign) != nil {
		return fmt.Errorf("schema 2 database already has bucket %s: %w", bucketForeign, errdefs.ErrFailedPrecondition)
	}
	if _, err := tx.CreateBucket(bucketForeign); err != nil {
		return fmt.Errorf("create bucket %s: %w", bucketForeign, err)
	}
	return nil
}

// migrateSchema3: a version 3 database is a valid version 4 one.
func migrateSchema3(*bolt.Tx) error { return nil }

// opWarmV4 is the op of a warm device in a schema 4 journal.
const opWarmV4 Op = 9

// migrateSchema4 creates the warm bucket, moves the journal's warm entries
// into it, rewrites the other entries without their transaction id, the
// pool info with IDsScanned false and the records with CommitID 0.
func migrateSchema4(tx *bolt.Tx) error {
	if tx.Bucket(bucketWarm) != nil {
		return fmt.Errorf("schema 4 database already has bucket %s: %w", bucketWarm, errdefs.ErrFailedPrecondition)
	}
	warm, err := tx.CreateBucket(bucketWarm)
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", bucketWarm, err)
	}
	journal := tx.Bucket(bucketJournal)
	if journal == nil {
		return fmt.Errorf("%w: bucket %s missing: %w", errCorrupt, bucketJournal, errdefs.ErrDataLoss)
	}
	type kv struct{ k, v []byte }
	var keep []kv
	var moved [][]byte
	if err := journal.ForEach(func(k, v []byte) error {
		if len(k) != 8 {
			return fmt.Errorf("%w: journal key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
		}
		e, err := entryFromV4(binary.BigEndian.Uint64(k), v)
		if err != nil {
			return err
		}
		if e.Op != opWarmV4 {
			keep = append(keep, kv{bytes.Clone(k), encodeEntry(&e)})
			return nil
		}
		if e.DeviceID == 0 || e.Key == "" {
			return fmt.Errorf("%w: schema 4 warm entry %d has device %d, parent %q: %w", errCorrupt, e.Seq, e.DeviceID, e.Key, errdefs.ErrDataLoss)
		}
		w := Warm{DeviceID: e.DeviceID, Parent: e.Key, OriginID: e.OriginID, Size: e.Size, Created: e.Created}
		if warm.Get(idKey(w.DeviceID)) != nil {
			return fmt.Errorf("%w: schema 4 journal has device %d warm twice: %w", errCorrupt, w.DeviceID, errdefs.ErrDataLoss)
		}
		if err := warm.Put(idKey(w.DeviceID), encodeWarm(&w)); err != nil {
			return fmt.Errorf("write warm device %d: %w", w.DeviceID, err)
		}
		moved = append(moved, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	for _, k := range moved {
		if err := journal.Delete(k); err != nil {
			return fmt.Errorf("delete journal entry %x: %w", k, err)
		}
	}
	for _, r := range keep {
		if err := journal.Put(r.k, r.v); err != nil {
			return fmt.Errorf("rewrite journal entry %x: %w", r.k, err)
		}
	}
	meta := tx.Bucket(bucketMeta)
	if v := meta.Get(metaPool); v != nil {
		if err := meta.Put(metaPool, poolInfoFromV4(v)); err != nil {
			return fmt.Errorf("write pool info: %w", err)
		}
	}
	// Records get CommitID 0: none reserved yet.
	return rewriteBucket(tx, bucketSnapshots, func(_, v []byte) ([]byte, error) { return append(bytes.Clone(v), 0), nil })
}

// poolInfoFromV4 adds IDsScanned, false, to a pool info of schemas 2 to 4.
func poolInfoFromV4(v []byte) []byte { return append(bytes.Clone(v), 0) }

// entryFromV4 decodes a journal entry of schemas 2 to 4: today's fields
// with a transaction id after the origin, and op 9 for warm devices.
func entryFromV4(seq uint64, v []byte) (Entry, error) {
	d := decoder{b: v}
	e := Entry{Seq: seq}
	e.Op = Op(d.byte("op"))
	e.DeviceID = d.uint32("device id")
	e.OriginID = d.uint32("origin id")
	d.uvarint("transaction id")
	e.Size = d.uvarint("size")
	e.Created = d.time("created")
	e.Key = d.string("key")
	e.Name = d.string("name")
	if d.err == nil && !e.Op.valid() && e.Op != opWarmV4 {
		d.err = fmt.Errorf("%w: unknown %s", errCorrupt, e.Op)
	}
	if err := d.finish(fmt.Sprintf("schema 4 journal entry %d", seq)); err != nil {
		return Entry{}, err
	}
	return e, nil
}

// rewriteBucket replaces every value of bucket name by fn's result. Values
// are collected first because bbolt forbids writes during ForEach, and
// copied because a write may move the pages they point into.
func rewriteBucket(tx *bolt.Tx, name []byte, fn func(k, v []byte) ([]byte, error)) error {
	b := tx.Bucket(name)
	if b == nil {
		return fmt.Errorf("%w: bucket %s missing: %w", errCorrupt, name, errdefs.ErrDataLoss)
	}
	type kv struct{ k, v []byte }
	var out []kv
	if err := b.ForEach(func(k, v []byte) error {
		nv, err := fn(k, v)
		if err != nil {
			return err
		}
		out = append(out, kv{bytes.Clone(k), bytes.Clone(nv)})
		return nil
	}); err != nil {
		return err
	}
	for _, r := range out {
		if err := b.Put(r.k, r.v); err != nil {
			return fmt.Errorf("rewrite %s %q: %w", name, r.k, err)
		}
	}
	return nil
}

const formatV1 = 1 // the byte every schema 1 record starts with

// snapshotFromV1: a version 2 snapshot is the version 1 one without its
// format byte.
func snapshotFromV1(k, v []byte) ([]byte, error) {
	if len(v) == 0 || v[0] != formatV1 {
		return nil, fmt.Errorf("%w: schema 1 snapshot %q has no format byte: %w", errCorrupt, k, errdefs.ErrDataLoss)
	}
	return v[1:], nil
}

// entryFromV1 drops the format byte and the trailing Data of a journal
// entry, which must be empty, and refuses the ops schema 1 named but never
// journaled (4 activate, 5 deactivate, 7 mkfs) or never named.
func entryFromV1(k, v []byte) ([]byte, error) {
	if len(k) != 8 {
		return nil, fmt.Errorf("%w: journal key has %d bytes: %w", errCorrupt, len(k), errdefs.ErrDataLoss)
	}
	seq := binary.BigEndian.Uint64(k)
	d := decoder{b: v}
	format := d.byte("format")
	op := d.byte("op")
	d.uint32("device id")
	d.uint32("origin id")
	d.uvarint("transaction id")
	d.uvarint("size")
	d.time("created")
	d.raw("key")
	d.raw("name")
	end := len(v) - len(d.b)
	data := d.raw("data")
	if err := d.finish(fmt.Sprintf("schema 1 journal entry %d", seq)); err != nil {
		return nil, err
	}
	switch {
	case format != formatV1:
		return nil, fmt.Errorf("%w: schema 1 journal entry %d has format %d: %w", errCorrupt, seq, format, errdefs.ErrDataLoss)
	case op != 1 && op != 2 && op != 3 && op != 6:
		return nil, fmt.Errorf("schema 1 journal entry %d has op %d, which schema 2 does not know: %w", seq, op, errdefs.ErrFailedPrecondition)
	case len(data) != 0:
		return nil, fmt.Errorf("schema 1 journal entry %d carries %d bytes of data, which schema 2 has no place for: %w", seq, len(data), errdefs.ErrFailedPrecondition)
	}
	return v[1:end], nil
}

// poolInfoFromV1 drops the format byte and the data device, metadata
// device and block size fields, which must be empty.
func poolInfoFromV1(v []byte) ([]byte, error) {
	d := decoder{b: v}
	format := d.byte("format")
	d.raw("name")
	nameEnd := len(v) - len(d.b)
	dataDev := d.raw("data device")
	metaDev := d.raw("metadata device")
	block := d.uint32("block size")
	restStart := len(v) - len(d.b)
	d.time("created")
	d.uint32("base device id")
	d.uvarint("base size")
	d.raw("base fs type")
	if err := d.finish("schema 1 pool info"); err != nil {
		return nil, err
	}
	if format != formatV1 {
		return nil, fmt.Errorf("%w: schema 1 pool info has format %d: %w", errCorrupt, format, errdefs.ErrDataLoss)
	}
	if len(dataDev) != 0 || len(metaDev) != 0 || block != 0 {
		return nil, fmt.Errorf("schema 1 pool info records data device %q, metadata device %q, block size %d, which schema 2 has no place for: %w",
			dataDev, metaDev, block, errdefs.ErrFailedPrecondition)
	}
	return append(bytes.Clone(v[1:nameEnd]), v[restStart:]...), nil
}
