package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

func TestOpenInUse(t *testing.T) {
	db, path := openTestDB(t)
	for _, timeout := range []time.Duration{50 * time.Millisecond, 0} {
		start := time.Now()
		second, err := Open(context.Background(), path, WithTimeout(timeout))
		took := time.Since(start)
		if err == nil {
			second.Close()
			t.Fatal("second open succeeded")
		}
		if !errors.Is(err, ErrInUse) || !errdefs.IsUnavailable(err) {
			t.Errorf("error %v is not ErrInUse and Unavailable", err)
		}
		want := timeout
		if want <= 0 {
			want = DefaultOpenTimeout
		}
		// bbolt polls the lock every 50ms and stops one poll early.
		if took < want-60*time.Millisecond || took > want+2*time.Second {
			t.Errorf("timeout %v: gave up after %v", timeout, took)
		}
	}
	// A raw bbolt handle is blocked the same way, so the lock is the
	// file's, not only ours.
	if _, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 50 * time.Millisecond}); err == nil {
		t.Error("raw bbolt open succeeded while held")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := Open(context.Background(), path, WithTimeout(50*time.Millisecond))
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	again.Close()
}

func TestOpenSchema(t *testing.T) {
	ctx := context.Background()
	var calls []string
	mark := func(name string) Migration {
		return func(tx *bolt.Tx) error {
			calls = append(calls, name)
			return tx.Bucket(bucketKV).Put([]byte(name), []byte{idMarker})
		}
	}
	failing := func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketKV).Put([]byte("partial"), []byte{idMarker}); err != nil {
			return err
		}
		return errors.New("migration broke")
	}
	version := func(t *testing.T, path string, schema uint32, migs []Migration) uint32 {
		t.Helper()
		db, err := Open(ctx, path, withSchema(schema, migs))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		v, err := db.SchemaVersion(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	t.Run("fresh", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		if v := version(t, path, SchemaVersion, nil); v != SchemaVersion {
			t.Errorf("version %d", v)
		}
	})
	t.Run("newer than known", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		version(t, path, SchemaVersion+1, nil)
		_, err := Open(ctx, path)
		if !errdefs.IsFailedPrecondition(err) {
			t.Errorf("open newer schema: %v", err)
		}
	})
	t.Run("migrate in order", func(t *testing.T) {
		calls = nil
		path := filepath.Join(t.TempDir(), "db")
		version(t, path, 1, nil)
		if v := version(t, path, 3, []Migration{mark("1to2"), mark("2to3")}); v != 3 {
			t.Errorf("version %d after migration", v)
		}
		if len(calls) != 2 || calls[0] != "1to2" || calls[1] != "2to3" {
			t.Errorf("migrations ran %v", calls)
		}
		// Already current: nothing runs again.
		if v := version(t, path, 3, []Migration{mark("again"), mark("again")}); v != 3 || len(calls) != 2 {
			t.Errorf("version %d, calls %v", v, calls)
		}
	})
	t.Run("missing migration", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		version(t, path, 1, nil)
		if _, err := Open(ctx, path, withSchema(3, []Migration{mark("1to2")})); !errdefs.IsFailedPrecondition(err) {
			t.Errorf("open without migration: %v", err)
		}
		if v := version(t, path, 1, nil); v != 1 {
			t.Errorf("version changed to %d", v)
		}
	})
	t.Run("failed migration rolls back", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		version(t, path, 1, nil)
		if _, err := Open(ctx, path, withSchema(2, []Migration{failing})); err == nil {
			t.Fatal("open with failing migration succeeded")
		}
		db, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		view(t, db, func(tx *Tx) error {
			if tx.kv.Get([]byte("partial")) != nil {
				t.Error("failed migration left a write behind")
			}
			return nil
		})
	})
}

func TestOpenForeignFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()

	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	if db, err := Open(ctx, garbage); err == nil {
		db.Close()
		t.Error("opened a file of zeros")
	}

	foreign := filepath.Join(dir, "foreign")
	bdb, err := bolt.Open(foreign, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := bdb.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("v1")); return err }); err != nil {
		t.Fatal(err)
	}
	bdb.Close()
	if _, err := Open(ctx, foreign); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("open foreign bbolt database: %v", err)
	}

	if _, err := Open(ctx, filepath.Join(dir, "no", "such", "dir", "db")); err == nil {
		t.Error("opened a path in a missing directory")
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Open(cancelled, filepath.Join(dir, "c")); !errors.Is(err, context.Canceled) {
		t.Errorf("open with cancelled context: %v", err)
	}
}

func TestTransactions(t *testing.T) {
	db, _ := openTestDB(t)
	err := db.Update(context.Background(), func(tx *Tx) error {
		if _, err := tx.AllocateID(); err != nil {
			return err
		}
		if _, err := tx.CreateSnapshot(Snapshot{Key: "a", Kind: active, State: StateReady, DeviceID: 1}); err != nil {
			return err
		}
		return errAbort
	})
	if err != errAbort {
		t.Fatalf("update returned %v", err)
	}
	view(t, db, func(tx *Tx) error {
		if _, err := tx.GetSnapshot("a"); errKind(err) != "notfound" {
			t.Errorf("aborted create visible: %v", err)
		}
		if used, _ := tx.IDInUse(1); used {
			t.Error("aborted allocation visible")
		}
		return nil
	})
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	ran := false
	if err := db.Update(cancelled, func(*Tx) error { ran = true; return nil }); !errors.Is(err, context.Canceled) || ran {
		t.Errorf("update with cancelled context: %v ran=%v", err, ran)
	}
	if err := db.View(cancelled, func(*Tx) error { ran = true; return nil }); !errors.Is(err, context.Canceled) || ran {
		t.Errorf("view with cancelled context: %v ran=%v", err, ran)
	}
	if db.Path() == "" {
		t.Error("empty path")
	}
	if n, err := db.Size(); err != nil || n <= 0 {
		t.Errorf("size %d %v", n, err)
	}
	db.Close()
	if err := db.View(context.Background(), func(*Tx) error { return nil }); err == nil {
		t.Error("view on closed db succeeded")
	}
}
