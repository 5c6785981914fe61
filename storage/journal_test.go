package storage

import (
	"context"
	"slices"
	"testing"
	"time"
)

func journalSeqs(t *testing.T, db *DB) []uint64 {
	t.Helper()
	var seqs []uint64
	view(t, db, func(tx *Tx) error {
		entries, err := tx.Journal()
		for _, e := range entries {
			seqs = append(seqs, e.Seq)
		}
		return err
	})
	return seqs
}

func TestJournal(t *testing.T) {
	clock := newTestClock()
	db, path := openTestDB(t, withClock(clock.now))
	given := time.Date(2020, 5, 6, 7, 8, 9, 10, time.UTC)
	in := []Entry{
		{Op: OpCreateSnap, DeviceID: 5, OriginID: 2, Key: "k", Size: 1 << 30},
		{Op: OpCommit, DeviceID: 5, Key: "k", Name: "n", Created: given},
		{Op: OpDelete, DeviceID: MaxDeviceID},
	}
	var seqs []uint64
	update(t, db, func(tx *Tx) error {
		for _, e := range in {
			e.Seq = 999 // ignored
			seq, err := tx.AddJournal(e)
			if err != nil {
				return err
			}
			seqs = append(seqs, seq)
		}
		return nil
	})
	if !slices.IsSorted(seqs) || seqs[0] == 0 || seqs[0] == seqs[1] {
		t.Fatalf("seqs %v", seqs)
	}
	view(t, db, func(tx *Tx) error {
		got, err := tx.Journal()
		if err != nil {
			return err
		}
		if len(got) != len(in) {
			t.Fatalf("journal %v", got)
		}
		for i, e := range got {
			want := in[i]
			if e.Seq != seqs[i] || e.Op != want.Op || e.DeviceID != want.DeviceID || e.OriginID != want.OriginID ||
				e.Key != want.Key || e.Name != want.Name || e.Size != want.Size {
				t.Errorf("entry %d = %v, want %v", i, e, want)
			}
			if e.Created.IsZero() || (!want.Created.IsZero() && !e.Created.Equal(want.Created)) {
				t.Errorf("entry %d created %v", i, e.Created)
			}
		}
		one, err := tx.GetJournal(seqs[1])
		if err != nil || one.Name != "n" {
			t.Errorf("GetJournal = %v, %v", one, err)
		}
		if _, err := tx.GetJournal(12345); errKind(err) != "notfound" {
			t.Errorf("GetJournal(missing) = %v", err)
		}
		return nil
	})
	update(t, db, func(tx *Tx) error { return tx.FinishJournal(seqs[1]) })
	if got := journalSeqs(t, db); !slices.Equal(got, []uint64{seqs[0], seqs[2]}) {
		t.Errorf("after finish: %v", got)
	}
	err := db.Update(context.Background(), func(tx *Tx) error { return tx.FinishJournal(seqs[1]) })
	if errKind(err) != "notfound" {
		t.Errorf("finish twice: %v", err)
	}
	// Sequence numbers keep growing across reopen and emptying.
	db.Close()
	db, err = Open(context.Background(), path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if got := journalSeqs(t, db); !slices.Equal(got, []uint64{seqs[0], seqs[2]}) {
		t.Errorf("after reopen: %v", got)
	}
	update(t, db, func(tx *Tx) error {
		if err := tx.FinishJournal(seqs[0]); err != nil {
			return err
		}
		if err := tx.FinishJournal(seqs[2]); err != nil {
			return err
		}
		seq, err := tx.AddJournal(Entry{Op: OpCreateThin, DeviceID: 1})
		if seq <= seqs[2] {
			t.Errorf("new seq %d after %v", seq, seqs)
		}
		return err
	})
}

func TestJournalInvalid(t *testing.T) {
	db, _ := openTestDB(t)
	for _, e := range []Entry{
		{},
		{Op: 4, DeviceID: 1},
		{Op: 200, DeviceID: 1},
		{Op: OpDelete, DeviceID: MaxDeviceID + 1},
		{Op: OpCreateSnap, DeviceID: 1, OriginID: MaxDeviceID + 1},
	} {
		err := db.Update(context.Background(), func(tx *Tx) error { _, err := tx.AddJournal(e); return err })
		if errKind(err) != "invalid" {
			t.Errorf("AddJournal(%v) = %v", e, err)
		}
	}
	if got := journalSeqs(t, db); len(got) != 0 {
		t.Errorf("journal %v", got)
	}
}

func TestOpString(t *testing.T) {
	for op, want := range map[Op]string{
		OpCreateThin: "create_thin", OpCreateSnap: "create_snap", OpDelete: "delete", OpCommit: "commit",
		OpCommitSnap: "commit_snap", 9: "op(9)", 4: "op(4)", 200: "op(200)",
	} {
		if got := op.String(); got != want {
			t.Errorf("%d: %q, want %q", op, got, want)
		}
	}
}

func TestPoolValues(t *testing.T) {
	db, path := openTestDB(t)
	pool := PoolInfo{Name: "thin-pool", Created: time.Date(2026, 11, 27, 1, 2, 3, 4, time.UTC),
		BaseDeviceID: 1, BaseSize: 10 << 30, BaseFSType: "ext4"}
	view(t, db, func(tx *Tx) error {
		if v, err := tx.TransactionID(); err != nil || v != 0 {
			t.Errorf("initial txid %d %v", v, err)
		}
		if _, err := tx.PoolInfo(); errKind(err) != "notfound" {
			t.Errorf("initial pool info: %v", err)
		}
		return nil
	})
	update(t, db, func(tx *Tx) error {
		if err := tx.SetTransactionID(1<<40 + 3); err != nil {
			return err
		}
		return tx.SetPoolInfo(pool)
	})
	db.Close()
	db, err := Open(context.Background(), path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	view(t, db, func(tx *Tx) error {
		if v, err := tx.TransactionID(); err != nil || v != 1<<40+3 {
			t.Errorf("txid %d %v", v, err)
		}
		if got, err := tx.PoolInfo(); err != nil || got != pool {
			t.Errorf("pool info %+v %v", got, err)
		}
		return nil
	})
}
