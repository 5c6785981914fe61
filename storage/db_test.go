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
	if !errors.Is(err, errAbort) {
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
	if n, err := db.Size(); err != nil || n <= 0 {
		t.Errorf("size %d %v", n, err)
	}
	db.Close()
	if err := db.View(context.Background(), func(*Tx) error { return nil }); err == nil {
		t.Error("view on closed db succeeded")
	}
}

// TestCleanStop: the clean-stop mark is absent in a new database, set and
// cleared on request.
func TestCleanStop(t *testing.T) {
	db, _ := openTestDB(t)
	view(t, db, func(tx *Tx) error {
		if tx.CleanStop() {
			t.Error("a new database says it stopped cleanly")
		}
		if err := tx.SetCleanStop(true); errKind(err) != "precondition" {
			t.Errorf("SetCleanStop in a read transaction: %v", err)
		}
		return nil
	})
	for _, clean := range []bool{true, false, true} {
		update(t, db, func(tx *Tx) error { return tx.SetCleanStop(clean) })
		view(t, db, func(tx *Tx) error {
			if tx.CleanStop() != clean {
				t.Errorf("CleanStop() = %v after SetCleanStop(%v)", tx.CleanStop(), clean)
			}
			return nil
		})
	}
}
