package snapshotter

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// behindOurBack creates thin ids in the fake pool as another program would.
func (p *fakePool) behindOurBack(ids ...uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range ids {
		p.thins[id] = 0
	}
}

func foreignIDs(t *testing.T, db *storage.DB) []uint32 {
	t.Helper()
	var ids []uint32
	if err := db.View(context.Background(), func(tx *storage.Tx) (err error) {
		ids, err = tx.ForeignIDs()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestForeignIDs: a create whose id the pool already has moves on to the
// next id; the taken ids are never used or deleted, check reports them and
// only --release-foreign frees them.
func TestForeignIDs(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	// The first two ids are taken before the daemon starts (its first
	// start lists them as foreign), and 6 after it: a gets 4, with 5
	// reserved for its commit, and b's create finds 6 taken.
	pool.behindOurBack(1, 2)
	s := mustNewUnclosed(t, root, pool)
	pool.behindOurBack(6)
	for _, k := range []string{"a", "b", "c"} {
		if _, err := s.Prepare(ctx, k, ""); err != nil {
			t.Fatalf("prepare %s: %v", k, err)
		}
	}
	var got []uint32
	for _, k := range []string{"a", "b", "c"} {
		snap, err := s.ready(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, snap.DeviceID)
	}
	// The base took 3; b skips 6 (each active reserves the next id for
	// its commit: 5, 8, 10).
	if want := []uint32{4, 7, 9}; !slices.Equal(got, want) {
		t.Errorf("device ids %v, want %v", got, want)
	}
	if ids := foreignIDs(t, s.db); !slices.Equal(ids, []uint32{1, 2, 6}) {
		t.Errorf("foreign ids %v, want [1 2 6]", ids)
	}
	if !slices.Equal(pool.ids(), []uint32{1, 2, 3, 4, 6, 7, 9}) {
		t.Errorf("pool ids %v: a foreign device was deleted", pool.ids())
	}
	var entries []storage.Entry
	_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { entries, err = tx.Journal(); return err })
	if len(entries) != 0 {
		t.Errorf("journal left %v", entries)
	}

	// A restart keeps them foreign and leaves their devices alone.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustNew(t, root, pool)
	if _, err := s.Prepare(ctx, "d", ""); err != nil {
		t.Fatal(err)
	}
	if snap, _ := s.ready(ctx, "d"); snap.DeviceID != 11 {
		t.Errorf("d got id %d, want 11", snap.DeviceID)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The owner of 2 deleted it meanwhile.
	if err := pool.DeleteThin(2); err != nil {
		t.Fatal(err)
	}
	db, err := storage.Open(ctx, filepath.Join(root, dbFile), storage.WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ck, err := openCheck(ctx, Config{Root: root, BaseSize: 64 << 20}, db, pool, func(context.Context, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"foreign_id  1", "foreign_id  2", "foreign_id  6"}
	for _, opts := range []CheckOptions{{}, {Repair: true}} {
		r, err := ck.Check(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		if got := summary(r.Remaining); !slices.Equal(got, want) {
			t.Errorf("%+v: remaining %v, want %v", opts, got, want)
		}
	}
	if !slices.Equal(pool.ids(), []uint32{1, 3, 4, 6, 7, 9, 11}) {
		t.Errorf("pool ids %v after a repair without --release-foreign", pool.ids())
	}
	r, err := ck.Check(ctx, CheckOptions{Repair: true, ReleaseForeign: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean {
		t.Errorf("not clean after --release-foreign: %+v", r.Remaining)
	}
	for _, f := range r.Findings {
		if !f.Repaired {
			t.Errorf("%s %d not repaired: %s", f.Kind, f.DeviceID, f.Error)
		}
	}
	if !slices.Equal(pool.ids(), []uint32{3, 4, 7, 9, 11}) {
		t.Errorf("pool ids %v after --release-foreign, want the foreign devices deleted", pool.ids())
	}
	if ids := foreignIDs(t, db); len(ids) != 0 {
		t.Errorf("foreign ids %v left", ids)
	}
	// Freed ids are handed out again.
	if err := db.Update(ctx, func(tx *storage.Tx) error {
		id, err := tx.AllocateID()
		if err == nil && id != 1 {
			t.Errorf("allocated %d, want the freed 1", id)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// TestForeignIDsBounded: a create gives up after maxIDTries taken ids with
// FailedPrecondition and leaves nothing pending.
func TestForeignIDsBounded(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	var taken []uint32
	for id := uint32(2); id < 2+maxIDTries; id++ {
		taken = append(taken, id)
	}
	pool.behindOurBack(taken...)
	_, err := s.Prepare(ctx, "a", "")
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("prepare: %v, want FailedPrecondition", err)
	}
	if _, err := s.Stat(ctx, "a"); !errdefs.IsNotFound(err) {
		t.Errorf("stat after the failed prepare: %v", err)
	}
	if ids := foreignIDs(t, s.db); !slices.Equal(ids, taken) {
		t.Errorf("foreign %v, want %v", ids, taken)
	}
	// The next try starts past them.
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if snap, _ := s.ready(ctx, "a"); snap.DeviceID != 2+maxIDTries {
		t.Errorf("id %d, want %d", snap.DeviceID, 2+maxIDTries)
	}
	if len(pool.ids()) != maxIDTries+2 {
		t.Errorf("pool ids %v", pool.ids())
	}
}

// TestForeignIDsCommitAndWarm: Commit's new device and the worker's warm
// devices skip ids the pool already has, like Prepare, and never delete
// those devices.
func TestForeignIDsCommitAndWarm(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s, err := newFake(t, t.TempDir(), pool)
	if err != nil {
		t.Fatal(err)
	}
	// No worker: the refill runs here.
	stopWorker(s)
	t.Cleanup(func() { s.Close() })
	if _, err := s.Prepare(ctx, "a", ""); err != nil { // base 1, a 2 (3 for its commit)
		t.Fatal(err)
	}
	pool.behindOurBack(3)
	if err := s.Commit(ctx, "l", "a"); err != nil {
		t.Fatalf("commit onto a foreign id: %v", err)
	}
	if snap, err := s.ready(ctx, "l"); err != nil || snap.DeviceID != 4 {
		t.Errorf("committed %+v %v, want device 4", snap, err)
	}
	if w := warmOf(t, s)["l"]; !slices.Equal(w, []uint32{2}) {
		t.Errorf("warm devices of l %v, want [2]", w)
	}
	if _, err := s.Prepare(ctx, "b", "l"); err != nil { // takes warm 2 (5 for its commit)
		t.Fatal(err)
	}
	pool.behindOurBack(6)
	if err := s.makeWarm(ctx, "l", false); err != nil {
		t.Fatalf("warm device onto a foreign id: %v", err)
	}
	if w := warmOf(t, s)["l"]; !slices.Equal(w, []uint32{7}) {
		t.Errorf("warm devices of l %v, want [7]", w)
	}
	if ids := foreignIDs(t, s.db); !slices.Equal(ids, []uint32{3, 6}) {
		t.Errorf("foreign ids %v, want [3 6]", ids)
	}
	if err := s.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(pool.ids(), []uint32{1, 2, 3, 4, 6}) {
		t.Errorf("pool ids %v, want [1 2 3 4 6]: a foreign device was deleted or the warm one kept", pool.ids())
	}
	var entries []storage.Entry
	_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { entries, err = tx.Journal(); return err })
	if len(entries) != 0 {
		t.Errorf("journal left %v", entries)
	}
}

// TestCrashOnTakenID: a create picks an id someone else's device already
// holds, and the daemon crashes right after the pool answers EEXIST, before
// it records the id foreign. Recovery cannot tell that device from one its
// own create made, so it must keep it and record the id foreign: with the
// pool's ids listed at the restart (the device is then found there under a
// pending create) and without thin-provisioning-tools (any device of a
// pending create is kept). A create the database proves it made is deleted
// as before (TestCrashRecovery).
func TestCrashOnTakenID(t *testing.T) {
	for _, tools := range []bool{true, false} {
		t.Run(fmt.Sprintf("tools=%v", tools), func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			pool := newFakePool("tp")
			// Without tools the first start cannot list the pool: the
			// foreign device is not known when the create picks its id.
			pool.noTools = true
			s, err := newFake(t, root, pool)
			if err != nil {
				t.Fatal(err)
			}
			stopWorker(s)
			pool.behindOurBack(2) // the base has 1; a would get 2
			pool.exists = func(string) { panic(crash{}) }
			func() {
				defer func() {
					if r := recover(); r == nil {
						t.Fatal("no crash")
					} else if _, ok := r.(crash); !ok {
						panic(r)
					}
				}()
				_, _ = s.Prepare(ctx, "a", "")
			}()
			pool.exists = nil
			s.db.Close() // only the database file and the pool survive

			pool.noTools = !tools
			s = mustNew(t, root, pool)
			if !slices.Contains(pool.ids(), 2) {
				t.Fatalf("pool ids %v: recovery deleted the device it found at id 2", pool.ids())
			}
			if ids := foreignIDs(t, s.db); !slices.Equal(ids, []uint32{2}) {
				t.Errorf("foreign ids %v, want [2]", ids)
			}
			if _, err := s.ready(ctx, "a"); !errdefs.IsNotFound(err) {
				t.Errorf("record of the interrupted create: %v", err)
			}
			var entries []storage.Entry
			_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { entries, err = tx.Journal(); return err })
			if len(entries) != 0 {
				t.Errorf("journal left %v", entries)
			}
			if _, err := s.Prepare(ctx, "a", ""); err != nil {
				t.Fatal(err)
			}
			if snap, _ := s.ready(ctx, "a"); snap.DeviceID == 2 {
				t.Errorf("a got the foreign id 2")
			}
		})
	}
}

// TestScanMarksForeign: the first start lists the pool's thin ids and
// records those the database does not hold as foreign, before any create
// could pick them; later starts do not list them again.
func TestScanMarksForeign(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	pool.behindOurBack(1, 3)
	s := mustNew(t, root, pool)
	if ids := foreignIDs(t, s.db); !slices.Equal(ids, []uint32{1, 3}) {
		t.Errorf("foreign ids %v, want [1 3]", ids)
	}
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	// No create met the foreign devices: the base took 2, a took 4.
	if snap, _ := s.ready(ctx, "a"); snap.DeviceID != 4 {
		t.Errorf("a got id %d, want 4", snap.DeviceID)
	}
	var pi storage.PoolInfo
	_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { pi, err = tx.PoolInfo(); return err })
	if !pi.IDsScanned || pi.BaseDeviceID != 2 {
		t.Errorf("pool info %+v: want scanned, base 2", pi)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	n := pool.reserved
	mustNew(t, root, pool)
	if pool.reserved != n {
		t.Errorf("the second start took %d metadata snapshots, want none", pool.reserved-n)
	}
}
