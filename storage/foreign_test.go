package storage

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func TestForeignIDs(t *testing.T) {
	db, path := openTestDB(t)
	update(t, db, func(tx *Tx) error {
		for want := uint32(1); want <= 3; want++ {
			if id, err := tx.AllocateID(); err != nil || id != want {
				t.Fatalf("alloc %d %v, want %d", id, err, want)
			}
		}
		if _, err := tx.CreateSnapshot(Snapshot{Key: "a", Kind: active, State: StateReady, DeviceID: 1, Size: 1 << 20, FSType: "ext4"}); err != nil {
			return err
		}
		for _, c := range []struct {
			id   uint32
			want string
		}{
			{1, "precondition"}, // owned by "a"
			{2, ""},             // allocated for a create that found it taken
			{2, ""},             // again: no-op
			{7, ""},             // not in use: reserved
			{0, "invalid"},
		} {
			if err := tx.MarkForeign(c.id); errKind(err) != c.want {
				t.Errorf("mark %d: %v, want %q", c.id, err, c.want)
			}
		}
		if err := tx.ReleaseID(2); errKind(err) != "precondition" {
			t.Errorf("release of a foreign id: %v", err)
		}
		if err := tx.UnmarkForeign(3); errKind(err) != "notfound" {
			t.Errorf("unmark of a non-foreign id: %v", err)
		}
		return nil
	})

	// Foreign ids survive a reopen and are never handed out.
	db.Close()
	db, err := Open(context.Background(), path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	update(t, db, func(tx *Tx) error {
		ids, err := tx.ForeignIDs()
		if err != nil || !reflect.DeepEqual(ids, []uint32{2, 7}) {
			t.Errorf("foreign %v %v, want [2 7]", ids, err)
		}
		for _, want := range []uint32{4, 5, 6, 8} {
			if id, err := tx.AllocateID(); err != nil || id != want {
				t.Errorf("alloc %d %v, want %d", id, err, want)
			}
		}
		// Released by the operator: unmark, then release like any id.
		if err := tx.UnmarkForeign(2); err != nil {
			return err
		}
		if used, _ := tx.IDInUse(2); !used {
			t.Error("unmarked id 2 is no longer allocated; it must stay until released")
		}
		if err := tx.ReleaseID(2); err != nil {
			return err
		}
		if id, err := tx.AllocateID(); err != nil || id != 2 {
			t.Errorf("alloc after release %d %v, want 2", id, err)
		}
		ids, err = tx.ForeignIDs()
		if err != nil || !reflect.DeepEqual(ids, []uint32{7}) {
			t.Errorf("foreign %v %v, want [7]", ids, err)
		}
		return nil
	})
	view(t, db, func(tx *Tx) error {
		if err := tx.MarkForeign(9); errKind(err) != "precondition" {
			t.Errorf("mark in a read transaction: %v", err)
		}
		return nil
	})
}

// TestMigrateSchema2 upgrades a version 2 database (no ids-foreign bucket)
// and keeps its ids.
func TestMigrateSchema2(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := Open(ctx, path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	update(t, db, func(tx *Tx) error {
		for range 3 {
			if _, err := tx.AllocateID(); err != nil {
				return err
			}
		}
		return tx.ReleaseID(2)
	})
	db.Close()
	// Make it what version 2 wrote.
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketForeign); err != nil {
			return err
		}
		return putSchema(tx, 2)
	})

	// Only the step to 3 (TestMigrateSchema3 takes it on to 4).
	db, err = Open(ctx, path, WithNoSync(), withSchema(3, migrations[:2]))
	if err != nil {
		t.Fatal(err)
	}
	update(t, db, func(tx *Tx) error {
		if ids, err := tx.ForeignIDs(); err != nil || len(ids) != 0 {
			t.Errorf("foreign %v %v, want none", ids, err)
		}
		if err := tx.MarkForeign(3); err != nil {
			return err
		}
		if id, err := tx.AllocateID(); err != nil || id != 2 {
			t.Errorf("alloc %d %v, want the released 2", id, err)
		}
		return nil
	})
	db.Close()
	if v := schemaOf(t, path); v != 3 {
		t.Errorf("schema %d, want 3", v)
	}

	// A version 2 file that somehow has the bucket is not guessed at.
	rawUpdate(t, path, func(tx *bolt.Tx) error { return putSchema(tx, 2) })
	if _, err := Open(ctx, path, WithNoSync()); errKind(err) != "precondition" {
		t.Errorf("open of a version 2 file with ids-foreign: %v", err)
	}
}
