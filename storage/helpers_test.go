package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// testClock is a strictly increasing clock so tests can compare times
// exactly and see every bump.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTestClock() *testClock {
	return &testClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Second)
	return c.t
}

func (c *testClock) last() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func openTestDB(t testing.TB, opts ...Opt) (*DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "meta.db")
	db, err := Open(context.Background(), path, append([]Opt{WithNoSync()}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db, path
}

func update(t testing.TB, db *DB, fn func(tx *Tx) error) {
	t.Helper()
	if err := db.Update(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
}

func view(t testing.TB, db *DB, fn func(tx *Tx) error) {
	t.Helper()
	if err := db.View(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
}

// errKind names the errdefs class of err so tests can compare expected
// and actual failures in tables.
func errKind(err error) string {
	switch {
	case err == nil:
		return ""
	case errdefs.IsNotFound(err):
		return "notfound"
	case errdefs.IsAlreadyExists(err):
		return "exists"
	case errdefs.IsInvalidArgument(err):
		return "invalid"
	case errdefs.IsFailedPrecondition(err):
		return "precondition"
	case errdefs.IsResourceExhausted(err):
		return "exhausted"
	case errdefs.IsUnavailable(err):
		return "unavailable"
	case errdefs.IsDataLoss(err):
		return "dataloss"
	}
	return "other: " + err.Error()
}

var errAbort = errors.New("abort transaction")

// Test-only views of the database, which the snapshotter has no use for.

// IDOwner returns the key of the snapshot record owning id ("" for an id
// allocated but not attached to a record) and whether id is in use.
func (tx *Tx) IDOwner(id uint32) (owner string, inUse bool, err error) {
	if err := checkID(id); err != nil {
		return "", false, err
	}
	owner, inUse = tx.idOwner(id)
	return owner, inUse, nil
}

// Children returns the keys of the records (any state) whose parent is key,
// in key order. NotFound if key does not exist.
func (tx *Tx) Children(key string) ([]string, error) {
	if tx.snapshots.Get([]byte(key)) == nil {
		return nil, fmt.Errorf("snapshot %q: %w", key, errdefs.ErrNotFound)
	}
	prefix := childPrefix(key)
	var out []string
	c := tx.children.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		out = append(out, string(k[len(prefix):]))
	}
	return out, nil
}

// Size returns the current size of the database file in bytes.
func (d *DB) Size() (int64, error) {
	fi, err := os.Stat(d.db.Path())
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// Walk is WalkKeys over every key.
func (tx *Tx) Walk(fn func(snapshots.Info) error, fs ...string) error {
	return tx.WalkKeys(func(k string) (string, bool) { return k, true }, fn, fs...)
}

// commitFresh commits active key as name onto a newly allocated device id.
func (tx *Tx) commitFresh(key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (Snapshot, error) {
	id, err := tx.AllocateID()
	if err != nil {
		return Snapshot{}, err
	}
	s, err := tx.CommitActive(key, name, id, usage, opts...)
	if err != nil {
		// Back to the free list: the next allocation hands it out again.
		return s, errors.Join(err, tx.ReleaseID(id))
	}
	return s, nil
}
