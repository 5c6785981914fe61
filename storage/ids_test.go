package storage

import (
	"context"
	"encoding/binary"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// idStep is one id operation and its expected outcome.
type idStep struct {
	op   string // alloc, reserve, release, inuse, reopen
	id   uint32 // argument, or expected result of alloc
	want string // error kind, or "true"/"false" for inuse
}

func runIDSteps(t *testing.T, db *DB, path string, steps []idStep) *DB {
	t.Helper()
	for i, s := range steps {
		if s.op == "reopen" {
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			var err error
			if db, err = Open(context.Background(), path, WithNoSync()); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			continue
		}
		err := db.Update(context.Background(), func(tx *Tx) error {
			switch s.op {
			case "alloc":
				id, err := tx.AllocateID()
				if errKind(err) != s.want {
					t.Errorf("step %d: alloc: %v, want %q", i, err, s.want)
				} else if err == nil && id != s.id {
					t.Errorf("step %d: alloc = %d, want %d", i, id, s.id)
				}
			case "reserve":
				if err := tx.ReserveID(s.id); errKind(err) != s.want {
					t.Errorf("step %d: reserve %d: %v, want %q", i, s.id, err, s.want)
				}
			case "release":
				if err := tx.ReleaseID(s.id); errKind(err) != s.want {
					t.Errorf("step %d: release %d: %v, want %q", i, s.id, err, s.want)
				}
			case "inuse":
				used, err := tx.IDInUse(s.id)
				if err != nil {
					t.Errorf("step %d: inuse %d: %v", i, s.id, err)
				} else if (s.want == "true") != used {
					t.Errorf("step %d: inuse %d = %v", i, s.id, used)
				}
			default:
				t.Fatalf("bad op %s", s.op)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return db
}

func TestDeviceIDs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []idStep
	}{
		{"sequential", []idStep{{"alloc", 1, ""}, {"alloc", 2, ""}, {"alloc", 3, ""}, {"inuse", 3, "true"}, {"inuse", 4, "false"}}},
		{"reuse lowest released", []idStep{
			{"alloc", 1, ""}, {"alloc", 2, ""}, {"alloc", 3, ""}, {"alloc", 4, ""},
			{"release", 3, ""}, {"release", 2, ""}, {"inuse", 2, "false"},
			{"alloc", 2, ""}, {"alloc", 3, ""}, {"alloc", 5, ""},
		}},
		{"reserve above mark is skipped", []idStep{
			{"reserve", 1, ""}, {"reserve", 3, ""}, {"alloc", 2, ""}, {"alloc", 4, ""},
			{"reserve", 3, "exists"}, {"reserve", 4, "exists"},
		}},
		{"reserve released id", []idStep{
			{"alloc", 1, ""}, {"alloc", 2, ""}, {"release", 1, ""}, {"reserve", 1, ""}, {"alloc", 3, ""},
		}},
		{"release reserved above mark once", []idStep{
			{"reserve", 5, ""}, {"release", 5, ""}, {"alloc", 1, ""}, {"alloc", 2, ""}, {"alloc", 3, ""},
			{"alloc", 4, ""}, {"alloc", 5, ""}, {"alloc", 6, ""},
		}},
		{"release errors", []idStep{
			{"release", 1, "notfound"}, {"alloc", 1, ""}, {"release", 1, ""}, {"release", 1, "notfound"},
			{"release", 0, "invalid"}, {"release", MaxDeviceID + 1, "invalid"},
		}},
		{"reserve range", []idStep{
			{"reserve", 0, "invalid"}, {"reserve", MaxDeviceID + 1, "invalid"}, {"reserve", MaxDeviceID, ""}, {"inuse", MaxDeviceID, "true"},
		}},
		{"survives reopen", []idStep{
			{"alloc", 1, ""}, {"alloc", 2, ""}, {"alloc", 3, ""}, {"reserve", 7, ""}, {"release", 2, ""},
			{"reopen", 0, ""},
			{"inuse", 1, "true"}, {"inuse", 2, "false"}, {"inuse", 7, "true"},
			{"alloc", 2, ""}, {"alloc", 4, ""}, {"alloc", 5, ""}, {"alloc", 6, ""}, {"alloc", 8, ""},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, path := openTestDB(t)
			runIDSteps(t, db, path, tc.steps)
		})
	}
}

func TestDeviceIDsExhausted(t *testing.T) {
	db, path := openTestDB(t)
	// Move the mark near the end instead of allocating 16M ids.
	update(t, db, func(tx *Tx) error {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], MaxDeviceID-2)
		return tx.meta.Put(metaNextID, b[:])
	})
	runIDSteps(t, db, path, []idStep{
		{"reserve", MaxDeviceID, ""},
		{"alloc", MaxDeviceID - 2, ""},
		{"alloc", MaxDeviceID - 1, ""},
		{"alloc", 0, "exhausted"},
		{"reopen", 0, ""},
		{"alloc", 0, "exhausted"},
		{"release", MaxDeviceID - 1, ""},
		{"alloc", MaxDeviceID - 1, ""},
		{"release", MaxDeviceID, ""},
		{"alloc", MaxDeviceID, ""},
		{"alloc", 0, "exhausted"},
	})
}

func TestDeviceIDOwnership(t *testing.T) {
	db, _ := openTestDB(t)
	var id uint32
	update(t, db, func(tx *Tx) error {
		var err error
		if id, err = tx.AllocateID(); err != nil {
			return err
		}
		if _, err := tx.CreateSnapshot(Snapshot{Key: "a", Kind: active, State: StateReady, DeviceID: id}); err != nil {
			return err
		}
		if err := tx.ReleaseID(id); errKind(err) != "precondition" {
			t.Errorf("release owned id: %v", err)
		}
		c, err := tx.commitFresh("a", "c", snapshots.Usage{})
		if err != nil {
			return err
		}
		if owner, used, _ := tx.IDOwner(c.DeviceID); owner != "c" || !used {
			t.Errorf("after commit owner of the new id %q used %v", owner, used)
		}
		if owner, used, _ := tx.IDOwner(id); owner != "" || !used {
			t.Errorf("after commit owner of the active's id %q used %v", owner, used)
		}
		if err := tx.ReleaseID(c.DeviceID); errKind(err) != "precondition" {
			t.Errorf("release owned id: %v", err)
		}
		var ids []uint32
		var owners []string
		if err := tx.WalkIDs(func(i uint32, o string) error { ids, owners = append(ids, i), append(owners, o); return nil }); err != nil {
			return err
		}
		if !slices.Equal(ids, []uint32{id, c.DeviceID}) || !slices.Equal(owners, []string{"", "c"}) {
			t.Errorf("WalkIDs = %v %q", ids, owners)
		}
		if _, err := tx.RemoveSnapshot("c"); err != nil {
			return err
		}
		if owner, used, _ := tx.IDOwner(c.DeviceID); owner != "" || !used {
			t.Errorf("after remove owner %q used %v", owner, used)
		}
		if err := tx.ReleaseID(c.DeviceID); err != nil {
			t.Errorf("release after remove: %v", err)
		}
		if _, _, err := tx.IDOwner(0); errKind(err) != "invalid" {
			t.Errorf("IDOwner(0): %v", err)
		}
		if _, err := tx.IDInUse(MaxDeviceID + 1); errKind(err) != "invalid" {
			t.Errorf("IDInUse(max+1): %v", err)
		}
		return nil
	})
}
