package storage

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

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
