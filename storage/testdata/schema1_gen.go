// This file wrote schema1.db, a database in schema version 1 as the code of
// commit 75866ef (the last one with that schema) writes it; TestMigrateSchema1
// opens it with today's code. It is kept for the record and is not built
// (testdata is ignored by the go tool). To write the file again, copy this
// file as storage/fixture_test.go into a checkout of 75866ef and run
//
//	FIXTURE=$PWD/schema1.db go test ./storage -run TestWriteSchema1Fixture

package storage

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

func TestWriteSchema1Fixture(t *testing.T) {
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
	create := func(tx *Tx, s Snapshot) {
		t.Helper()
		id, err := tx.AllocateID()
		must(err)
		s.DeviceID, s.Size, s.FSType = id, 64<<20, "ext4"
		_, err = tx.CreateSnapshot(s)
		must(err)
	}
	// What the daemon writes on its first start: pool identity, the base
	// device (id 1) and its journal entry, finished.
	update(t, db, func(tx *Tx) error {
		base, err := tx.AllocateID()
		must(err)
		seq, err := tx.AddJournal(Entry{Op: OpCreateThin, DeviceID: base, Size: 64 << 20, TxID: 1})
		must(err)
		must(tx.SetPoolInfo(PoolInfo{Name: "tp", Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
			BaseDeviceID: base, BaseSize: 64 << 20, BaseFSType: "ext4"}))
		must(tx.SetTransactionID(1))
		return tx.FinishJournal(seq)
	})
	update(t, db, func(tx *Tx) error {
		// Two committed layers (ids 2, 3), the second with labels
		// changed after the commit.
		create(tx, Snapshot{Key: "extract-1", Kind: snapshots.KindActive, State: StateReady})
		_, err := tx.CommitActive("extract-1", "layer1", snapshots.Usage{Size: 4096, Inodes: 3},
			snapshots.WithLabels(map[string]string{"containerd.io/snapshot.ref": "sha256:1111"}))
		must(err)
		create(tx, Snapshot{Key: "extract-2", Kind: snapshots.KindActive, State: StateReady, Parent: "layer1"})
		_, err = tx.CommitActive("extract-2", "layer2", snapshots.Usage{Size: 8192, Inodes: 5})
		must(err)
		_, err = tx.SetShared("layer2", 1234)
		must(err)
		_, err = tx.UpdateInfo(snapshots.Info{Name: "layer2", Labels: map[string]string{"a": "1", "b": ""}})
		must(err)
		// An active container (4) and a view (5).
		create(tx, Snapshot{Key: "work", Kind: snapshots.KindActive, State: StateReady, Parent: "layer2",
			Labels: map[string]string{"containerd.io/snapshot/cri.container": "yes"}})
		create(tx, Snapshot{Key: "ro", Kind: snapshots.KindView, State: StateReady, Parent: "layer1"})
		// Interrupted work: a create (6), a removal (7), a commit of
		// "work" and a record being removed (8).
		create(tx, Snapshot{Key: "new", Kind: snapshots.KindActive, State: StateCreating, Parent: "layer2"})
		_, err = tx.AddJournal(Entry{Op: OpCreateSnap, DeviceID: 6, OriginID: 3, Key: "new", TxID: 8})
		must(err)
		create(tx, Snapshot{Key: "gone", Kind: snapshots.KindActive, State: StateReady})
		_, err = tx.RemoveSnapshot("gone")
		must(err)
		_, err = tx.AddJournal(Entry{Op: OpDelete, DeviceID: 7, Key: "gone"})
		must(err)
		_, err = tx.AddJournal(Entry{Op: OpCommit, DeviceID: 4, Key: "work", Name: "work-c"})
		must(err)
		create(tx, Snapshot{Key: "leaving", Kind: snapshots.KindView, State: StateRemoving, Parent: "layer2"})
		// A released id (9) and one reserved above the mark (100).
		id, err := tx.AllocateID()
		must(err)
		must(tx.ReleaseID(id))
		must(tx.ReserveID(100))
		return tx.SetTransactionID(7)
	})
}
