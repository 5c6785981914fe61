// This file wrote schema4.db, a database in schema version 4 as the code of
// commit b57b1ea (the last one with that schema) writes it; TestMigrateSchema4
// opens it with today's code. It is kept for the record and is not built
// (testdata is ignored by the go tool). To write the file again, copy this
// file as storage/fixture_test.go into a checkout of b57b1ea and run
//
//	FIXTURE=$PWD/schema4.db go test ./storage -run TestWriteSchema4Fixture

package storage

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

func TestWriteSchema4Fixture(t *testing.T) {
	out := os.Getenv("FIXTURE")
	if out == "" {
		t.Skip("FIXTURE not set")
	}
	clock := newTestClock() // 2026-01-02T03:04:06Z, then one second per call
	db, err := Open(context.Background(), out, withClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	create := func(tx *Tx, s Snapshot) uint32 {
		t.Helper()
		id, err := tx.AllocateID()
		must(err)
		s.DeviceID, s.Size, s.FSType = id, 64<<20, "ext4"
		_, err = tx.CreateSnapshot(s)
		must(err)
		return id
	}
	alloc := func(tx *Tx) uint32 {
		t.Helper()
		id, err := tx.AllocateID()
		must(err)
		return id
	}
	// The daemon's first start: pool identity and the base device (id 1).
	update(t, db, func(tx *Tx) error {
		base, err := tx.AllocateID()
		must(err)
		seq, err := tx.AddJournal(Entry{Op: OpCreateThin, DeviceID: base, Size: 64 << 20})
		must(err)
		must(tx.SetPoolInfo(PoolInfo{Name: "tp", Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
			BaseDeviceID: base, BaseSize: 64 << 20, BaseFSType: "ext4"}))
		must(tx.SetTransactionID(1))
		return tx.FinishJournal(seq)
	})
	update(t, db, func(tx *Tx) error {
		// A layer committed onto a new device (3) from its active (2),
		// which stays as a warm device of the layer.
		active := create(tx, Snapshot{Key: "extract-1", Kind: snapshots.KindActive, State: StateReady})
		layer1 := alloc(tx)
		_, err := tx.CommitActiveOnto("extract-1", "layer1", layer1, snapshots.Usage{Size: 4096, Inodes: 3},
			snapshots.WithLabels(map[string]string{"containerd.io/snapshot.ref": "sha256:1111"}))
		must(err)
		_, err = tx.AddJournal(Entry{Op: OpWarm, DeviceID: active, OriginID: layer1, Key: "layer1", Size: 64 << 20})
		must(err)
		// A second layer (5 from 4); a container (6) and a view (7).
		create(tx, Snapshot{Key: "extract-2", Kind: snapshots.KindActive, State: StateReady, Parent: "layer1"})
		layer2 := alloc(tx)
		_, err = tx.CommitActiveOnto("extract-2", "layer2", layer2, snapshots.Usage{Size: 8192, Inodes: 5})
		must(err)
		_, err = tx.SetShared("layer2", 1234)
		must(err)
		work := create(tx, Snapshot{Key: "work", Kind: snapshots.KindActive, State: StateReady, Parent: "layer2"})
		create(tx, Snapshot{Key: "ro", Kind: snapshots.KindView, State: StateReady, Parent: "layer1"})
		// A warm device the worker made for layer2's next child (8),
		// written before origins were recorded (OriginID 0).
		_, err = tx.AddJournal(Entry{Op: OpWarm, DeviceID: alloc(tx), Key: "layer2", Size: 64 << 20})
		must(err)
		// Operations in flight: a create (9, with a transaction id as
		// schema 1 could write), a removal of a view (10, its blocks
		// held by layer1's device) and a commit of "work" onto 11.
		newID := create(tx, Snapshot{Key: "new", Kind: snapshots.KindActive, State: StateCreating, Parent: "layer2"})
		_, err = tx.AddJournal(Entry{Op: OpCreateSnap, DeviceID: newID, OriginID: layer2, Key: "new", TxID: 8})
		must(err)
		gone := create(tx, Snapshot{Key: "gone", Kind: snapshots.KindView, State: StateReady, Parent: "layer1"})
		_, err = tx.RemoveSnapshot("gone")
		must(err)
		_, err = tx.AddJournal(Entry{Op: OpDelete, DeviceID: gone, OriginID: layer1, Key: "gone", Size: 64 << 20})
		must(err)
		_, err = tx.AddJournal(Entry{Op: OpCommitSnap, DeviceID: alloc(tx), OriginID: work, Key: "work", Name: "work-c", Size: 64 << 20})
		must(err)
		// A foreign id (12) and a released one (13).
		foreign := alloc(tx)
		must(tx.MarkForeign(foreign))
		must(tx.ReleaseID(alloc(tx)))
		return tx.SetTransactionID(1)
	})
}
