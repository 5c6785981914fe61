package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// SchemaVersion is the database layout this package reads and writes.
const SchemaVersion uint32 = 1

// DefaultOpenTimeout bounds how long Open waits for the file lock.
const DefaultOpenTimeout = time.Second

// ErrInUse is returned (wrapped, together with errdefs.ErrUnavailable) by Open
// when another process, or another handle in this process, holds the
// database.
var ErrInUse = errors.New("database is already in use by another process")

// Top-level buckets.
var (
	bucketMeta      = []byte("meta")      // schema, txid, hwm, pool info
	bucketKV        = []byte("kv")        // SetMeta / Meta
	bucketSnapshots = []byte("snapshots") // key -> encoded Snapshot
	bucketChildren  = []byte("children")  // childKey(parent, child) -> nil
	bucketIDsUsed   = []byte("ids-used")  // idKey -> owner snapshot key ("" if none)
	bucketIDsFree   = []byte("ids-free")  // idKey -> nil, released ids for reuse
	bucketJournal   = []byte("journal")   // u64Key(seq) -> encoded Entry

	allBuckets = [][]byte{bucketMeta, bucketKV, bucketSnapshots, bucketChildren, bucketIDsUsed, bucketIDsFree, bucketJournal}

	metaSchema = []byte("schema")
	metaTxID   = []byte("txid")
	metaNextID = []byte("next-id") // lowest id never handed out by AllocateID
	metaPool   = []byte("pool")
)

// Migration upgrades a database from schema version N to N+1 inside one
// write transaction.
type Migration func(tx *bolt.Tx) error

// migrations[n] upgrades version n+1 to n+2; empty while only version 1
// exists.
var migrations []Migration

// DB is one open database file. It is safe for concurrent use.
type DB struct {
	db   *bolt.DB
	path string
	now  func() time.Time
}

// Opt configures Open.
type Opt func(*options)

type options struct {
	timeout    time.Duration
	noSync     bool
	schema     uint32
	migrations []Migration
	now        func() time.Time
}

// WithTimeout sets how long Open waits for another holder to release the
// database before failing with ErrInUse. Zero or negative values are
// replaced by the default, because bbolt would otherwise wait forever.
func WithTimeout(d time.Duration) Opt {
	return func(o *options) {
		if d > 0 {
			o.timeout = d
		}
	}
}

// WithNoSync skips fsync on commit. A crash may then lose or corrupt the
// database, so this is for tests and benchmarks only.
func WithNoSync() Opt { return func(o *options) { o.noSync = true } }

// withSchema lets tests exercise the migration machinery.
func withSchema(version uint32, m []Migration) Opt {
	return func(o *options) { o.schema, o.migrations = version, m }
}

func withClock(now func() time.Time) Opt { return func(o *options) { o.now = now } }

// Open opens or creates the database at path, creating its buckets and
// running schema migrations as needed.
func Open(ctx context.Context, path string, opts ...Opt) (*DB, error) {
	o := options{
		timeout:    DefaultOpenTimeout,
		schema:     SchemaVersion,
		migrations: migrations,
		now:        time.Now,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:      o.timeout,
		NoSync:       o.noSync,
		FreelistType: bolt.FreelistMapType,
	})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open %s: %w (gave up after %s): %w", path, ErrInUse, o.timeout, errdefs.ErrUnavailable)
		}
		if errors.Is(err, berrors.ErrInvalid) || errors.Is(err, berrors.ErrChecksum) || errors.Is(err, berrors.ErrVersionMismatch) {
			return nil, fmt.Errorf("open %s: %w: %w", path, err, errdefs.ErrDataLoss)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	d := &DB{db: bdb, path: path, now: o.now}
	if err := bdb.Update(func(tx *bolt.Tx) error { return initSchema(tx, o.schema, o.migrations) }); err != nil {
		bdb.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return d, nil
}

func initSchema(tx *bolt.Tx, want uint32, migs []Migration) error {
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
		return fmt.Errorf("database schema version %d is newer than supported version %d: %w", have, want, errdefs.ErrFailedPrecondition)
	}
	for v := have; v < want; v++ {
		if int(v) > len(migs) || v == 0 || migs[v-1] == nil {
			return fmt.Errorf("no migration from schema version %d to %d: %w", v, v+1, errdefs.ErrFailedPrecondition)
		}
		if err := migs[v-1](tx); err != nil {
			return fmt.Errorf("migrate schema %d to %d: %w", v, v+1, err)
		}
	}
	// Later versions' buckets are created by their migrations, so any gap
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

// Close releases the database and its lock.
func (d *DB) Close() error { return d.db.Close() }

// Path returns the file path given to Open.
func (d *DB) Path() string { return d.path }

// Size returns the current size of the database file in bytes.
func (d *DB) Size() (int64, error) {
	fi, err := os.Stat(d.path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// SchemaVersion returns the schema version recorded in the database.
func (d *DB) SchemaVersion(ctx context.Context) (uint32, error) {
	var v uint32
	err := d.View(ctx, func(tx *Tx) error {
		raw := tx.tx.Bucket(bucketMeta).Get(metaSchema)
		if len(raw) != 4 {
			return fmt.Errorf("%w: schema version missing: %w", errCorrupt, errdefs.ErrDataLoss)
		}
		v = binary.BigEndian.Uint32(raw)
		return nil
	})
	return v, err
}

// View runs fn in a read-only transaction. Write methods of tx fail.
func (d *DB) View(ctx context.Context, fn func(tx *Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.db.View(func(btx *bolt.Tx) error { return fn(d.newTx(btx)) })
}

// Update runs fn in a write transaction, committed if fn returns nil and
// rolled back otherwise. Write transactions are serialized, so fn must stay
// short: no kernel work inside it.
func (d *DB) Update(ctx context.Context, fn func(tx *Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.db.Update(func(btx *bolt.Tx) error { return fn(d.newTx(btx)) })
}

func (d *DB) newTx(btx *bolt.Tx) *Tx {
	return &Tx{
		tx:        btx,
		now:       d.now,
		snapshots: btx.Bucket(bucketSnapshots),
		children:  btx.Bucket(bucketChildren),
		used:      btx.Bucket(bucketIDsUsed),
		free:      btx.Bucket(bucketIDsFree),
		journal:   btx.Bucket(bucketJournal),
		meta:      btx.Bucket(bucketMeta),
		kv:        btx.Bucket(bucketKV),
	}
}

// Tx is a transaction handed to View or Update callbacks. It must not be used
// after the callback returns.
type Tx struct {
	tx        *bolt.Tx
	now       func() time.Time
	snapshots *bolt.Bucket
	children  *bolt.Bucket
	used      *bolt.Bucket
	free      *bolt.Bucket
	journal   *bolt.Bucket
	meta      *bolt.Bucket
	kv        *bolt.Bucket
}

// Writable reports whether tx came from Update.
func (tx *Tx) Writable() bool { return tx.tx.Writable() }

func (tx *Tx) checkWritable() error {
	if !tx.tx.Writable() {
		return fmt.Errorf("write in read-only transaction: %w", errdefs.ErrFailedPrecondition)
	}
	return nil
}
