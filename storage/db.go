package storage

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// DefaultOpenTimeout bounds how long Open waits for the file lock.
const DefaultOpenTimeout = time.Second

// ErrInUse is returned (wrapped, together with errdefs.ErrUnavailable) by Open
// when another process, or another handle in this process, holds the
// database.
var ErrInUse = errors.New("database is already in use by another process")

// Top-level buckets.
var (
	bucketMeta      = []byte("meta")        // schema, txid, next-id, pool
	bucketSnapshots = []byte("snapshots")   // key -> encoded Snapshot
	bucketChildren  = []byte("children")    // childKey(parent, child) -> nil
	bucketIDsUsed   = []byte("ids-used")    // idKey -> owner snapshot key ("" if none)
	bucketIDsFree   = []byte("ids-free")    // idKey -> nil, released ids for reuse
	bucketJournal   = []byte("journal")     // u64Key(seq) -> encoded Entry
	bucketForeign   = []byte("ids-foreign") // idKey -> marker, ids the pool had before us (schema 3)
	bucketWarm      = []byte("warm")        // idKey -> encoded Warm (schema 5)

	allBuckets = [][]byte{bucketMeta, bucketSnapshots, bucketChildren, bucketIDsUsed, bucketIDsFree, bucketJournal, bucketForeign, bucketWarm}

	metaSchema = []byte("schema")  // u32: schemaVersion
	metaTxID   = []byte("txid")    // u64: pool transaction id
	metaNextID = []byte("next-id") // u32: lowest id never handed out by AllocateID
	metaPool   = []byte("pool")    // encoded PoolInfo
	metaClean  = []byte("clean")   // present: the last process stopped cleanly
)

// DB is one open database file. It is safe for concurrent use.
type DB struct {
	db    *bolt.DB
	now   func() time.Time
	group group
}

// Opt configures Open.
type Opt func(*options)

type options struct {
	timeout    time.Duration
	noSync     bool
	schema     uint32
	migrations []migration
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
func withSchema(version uint32, m []migration) Opt {
	return func(o *options) { o.schema, o.migrations = version, m }
}

func withClock(now func() time.Time) Opt { return func(o *options) { o.now = now } }

// Open opens or creates the database at path, creating its buckets or
// migrating an older schema as needed. A database of a newer schema, or a
// file that is not one of ours, is FailedPrecondition; a damaged one is
// DataLoss; one held by another handle is ErrInUse.
func Open(ctx context.Context, path string, opts ...Opt) (*DB, error) {
	o := options{
		timeout:    DefaultOpenTimeout,
		schema:     schemaVersion,
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
	d := &DB{db: bdb, now: o.now}
	if err := bdb.Update(func(tx *bolt.Tx) error { return initSchema(tx, o.schema, o.migrations) }); err != nil {
		bdb.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return d, nil
}

// Close releases the database and its lock.
func (d *DB) Close() error { return d.db.Close() }

// View runs fn in a read-only transaction. Write methods of tx fail.
func (d *DB) View(ctx context.Context, fn func(tx *Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.db.View(func(btx *bolt.Tx) error { return fn(d.newTx(btx)) })
}

// Update runs fn in a write transaction, committed if fn returns nil and
// rolled back otherwise. Write transactions are serialized, so fn must stay
// short: no kernel work and no locks inside it. Updates that wait for one
// another share a commit (see group), so fn may run more than once: it must
// change nothing outside tx but the results it assigns.
func (d *DB) Update(ctx context.Context, fn func(tx *Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.group.update(d, fn)
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
		foreign:   btx.Bucket(bucketForeign),
		warm:      btx.Bucket(bucketWarm),
		meta:      btx.Bucket(bucketMeta),
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
	foreign   *bolt.Bucket
	warm      *bolt.Bucket
	meta      *bolt.Bucket
}

func (tx *Tx) checkWritable() error {
	if !tx.tx.Writable() {
		return fmt.Errorf("write in read-only transaction: %w", errdefs.ErrFailedPrecondition)
	}
	return nil
}
