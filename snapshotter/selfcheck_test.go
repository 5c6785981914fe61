package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// runSummary is "kind key id repaired|left" per finding of a self-check.
func runSummary(fs []Finding) []string {
	out := []string{}
	for _, f := range fs {
		out = append(out, fmt.Sprintf("%s %s %d %s", f.Kind, f.Key, f.DeviceID, boolStr(f.Repaired, "repaired")))
	}
	return out
}

// journalRemoval removes the record of key and journals the removal of its
// device, as Remove does, without finishing it.
func journalRemoval(t *testing.T, s *Snapshotter, key string) uint32 {
	t.Helper()
	var id uint32
	if err := s.db.Update(context.Background(), func(tx *storage.Tx) error {
		removed, err := tx.RemoveSnapshot(key)
		id = removed.DeviceID
		if err != nil {
			return err
		}
		_, err = removalEntries(tx, removed)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

// allocateID takes a fresh id in the database only: a leaked id.
func allocateID(t *testing.T, s *Snapshotter) uint32 {
	t.Helper()
	var id uint32
	if err := s.db.Update(context.Background(), func(tx *storage.Tx) (err error) {
		id, err = tx.AllocateID()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func idInUse(t *testing.T, s *Snapshotter, id uint32) bool {
	t.Helper()
	var used bool
	if err := s.db.View(context.Background(), func(tx *storage.Tx) (err error) {
		used, err = tx.IDInUse(id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return used
}

// TestSelfCheck: the self-check repairs online what is safe (pending
// removals, leaked ids), leaves everything else for a person or for check
// --repair, and repairs nothing on an unhealthy pool.
func TestSelfCheck(t *testing.T) {
	tests := []struct {
		name string
		// breakIt damages the serving snapshotter's state and returns
		// the findings expected ("kind key id repaired|-").
		breakIt func(t *testing.T, s *Snapshotter, pool *fakePool) []string
		// after checks the state once the self-check ran.
		after func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun)
	}{
		{
			name:    "clean",
			breakIt: func(*testing.T, *Snapshotter, *fakePool) []string { return nil },
		},
		{
			name: "pending removal finished",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				id := journalRemoval(t, s, "lone")
				return []string{fmt.Sprintf("pending_journal lone %d repaired", id)}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				id := run.Findings[0].DeviceID
				if slices.Contains(pool.ids(), id) || idInUse(t, s, id) {
					t.Errorf("thin device %d: in the pool %v, id in use %v", id, pool.ids(), idInUse(t, s, id))
				}
			},
		},
		{
			name: "pending removal of an open device stays",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				pool.setOpen(s.deviceName(idOf(t, s, "lone")), 1)
				id := journalRemoval(t, s, "lone")
				return []string{fmt.Sprintf("pending_journal lone %d -", id)}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if f := run.Findings[0]; !strings.Contains(f.Error, "busy") {
					t.Errorf("busy removal: %+v", f)
				}
			},
		},
		{
			name: "leaked id released",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				return []string{fmt.Sprintf("leaked_id  %d repaired", allocateID(t, s))}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if id := run.Findings[0].DeviceID; idInUse(t, s, id) {
					t.Errorf("leaked id %d still in use", id)
				}
			},
		},
		{
			name: "ghost needs a person",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				id := idOf(t, s, "lone")
				pool.mu.Lock()
				delete(pool.devices, s.deviceName(id))
				delete(pool.thins, id)
				pool.mu.Unlock()
				return []string{fmt.Sprintf("ghost lone %d -", id)}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if f := run.Findings[0]; f.Action != "" {
					t.Errorf("ghost: %+v", f)
				}
			},
		},
		{
			name: "orphan left for check --repair",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				pool.mu.Lock()
				pool.thins[99] = 0
				pool.mu.Unlock()
				return []string{"orphan  99 -"}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if f := run.Findings[0]; f.Action != offlineOnly || !slices.Contains(pool.ids(), 99) {
					t.Errorf("orphan: %+v, pool %v", f, pool.ids())
				}
			},
		},
		{
			name: "interrupted create left for recovery",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				var id uint32
				if err := s.db.Update(context.Background(), func(tx *storage.Tx) (err error) {
					if id, err = tx.AllocateID(); err != nil {
						return err
					}
					if _, err := tx.CreateSnapshot(storage.Snapshot{Key: "n", Kind: snapshots.KindActive, State: storage.StateCreating,
						DeviceID: id, Size: 64 << 20, FSType: "ext4"}); err != nil {
						return err
					}
					_, err = tx.AddJournal(storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: idOf(t, s, "c"), Key: "n"})
					return err
				}); err != nil {
					t.Fatal(err)
				}
				return []string{fmt.Sprintf("pending_journal n %d -", id)}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if f := run.Findings[0]; f.Action != offlineOnly {
					t.Errorf("interrupted create: %+v", f)
				}
			},
		},
		{
			name: "unhealthy pool: nothing repaired",
			breakIt: func(t *testing.T, s *Snapshotter, pool *fakePool) []string {
				pool.mu.Lock()
				pool.status.NeedsCheck = true
				pool.mu.Unlock()
				return []string{"pool_unhealthy  0 -", fmt.Sprintf("leaked_id  %d -", allocateID(t, s))}
			},
			after: func(t *testing.T, s *Snapshotter, pool *fakePool, run CheckRun) {
				if id := run.Findings[1].DeviceID; !idInUse(t, s, id) || !strings.Contains(run.Findings[1].Action, "unhealthy") {
					t.Errorf("leaked id on an unhealthy pool: %+v, in use %v", run.Findings[1], idInUse(t, s, id))
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			pool := newFakePool("tp")
			s := mustNew(t, t.TempDir(), pool)
			mustLayer(ctx, t, s, "c", "c-active", "")
			for _, key := range []string{"a", "lone"} {
				if _, err := s.Prepare(ctx, key, "c"); err != nil {
					t.Fatal(err)
				}
			}
			settle(t, s)
			// Nothing finishes a removal behind the test.
			stopWorker(s)
			want := tc.breakIt(t, s, pool)
			if want == nil {
				want = []string{}
			}
			run := s.selfCheck(ctx, CheckPeriodic)
			if run.Error != "" || run.Trigger != CheckPeriodic || run.Ended.IsZero() || run.Duration <= 0 {
				t.Fatalf("run: %+v", run)
			}
			if got := runSummary(run.Findings); !slices.Equal(got, want) {
				t.Fatalf("self-check:\n got %q\nwant %q\n%+v", got, want, run.Findings)
			}
			for _, f := range run.Findings {
				if f.Repaired && (f.Action == "" || f.Error != "") {
					t.Errorf("repaired without action, or with an error: %+v", f)
				}
			}
			if tc.after != nil {
				tc.after(t, s, pool, run)
			}
			// What is left is what a check finds now.
			var left []string
			for _, f := range run.Findings {
				if !f.Repaired {
					left = append(left, fmt.Sprintf("%s %s %d", f.Kind, f.Key, f.DeviceID))
				}
			}
			r, err := s.CheckOnline(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(r.Findings); !slices.Equal(got, append([]string{}, left...)) {
				t.Errorf("check after the self-check: %q, want %q", got, left)
			}
			st, err := s.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.LastCheck.Ended != run.Ended || !slices.Equal(runSummary(st.LastCheck.Findings), want) {
				t.Errorf("Status.LastCheck = %+v, want the run %+v", st.LastCheck, run)
			}
			left2, repaired := st.LastCheck.Counts()
			for _, f := range run.Findings {
				if f.Repaired && repaired[f.Kind] == 0 || !f.Repaired && left2[f.Kind] == 0 {
					t.Errorf("Counts() = %v left, %v repaired; finding %+v", left2, repaired, f)
				}
			}
		})
	}
}

// TestSelfCheckLeakedIDTakenMeanwhile: an id the check saw leaked but that
// a create took before the repair stays allocated: the release reads the
// database again in its own transaction.
func TestSelfCheckLeakedIDTakenMeanwhile(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	stopWorker(s)
	id := allocateID(t, s)
	reads := 0
	pool.mu.Lock()
	pool.onThinIDs = func() {
		// After the second pass read the database: the id is released
		// and a create journals it, as a Prepare racing for it would.
		if reads++; reads != 2 {
			return
		}
		if err := s.db.Update(ctx, func(tx *storage.Tx) error {
			if err := tx.ReleaseID(id); err != nil {
				return err
			}
			got, err := tx.AllocateID()
			if err != nil {
				return err
			}
			if got != id {
				return fmt.Errorf("allocated %d, want %d", got, id)
			}
			_, err = tx.AddJournal(storage.Entry{Op: storage.OpCreateThin, DeviceID: id, Size: 64 << 20})
			return err
		}); err != nil {
			t.Error(err)
		}
	}
	pool.mu.Unlock()
	run := s.selfCheck(ctx, CheckPeriodic)
	if reads != 2 {
		t.Fatalf("%d passes, want 2", reads)
	}
	if got := runSummary(run.Findings); !slices.Equal(got, []string{fmt.Sprintf("leaked_id  %d repaired", id)}) ||
		!strings.Contains(run.Findings[0].Action, "no longer leaked") {
		t.Fatalf("self-check: %q %+v", got, run.Findings)
	}
	if !idInUse(t, s, id) {
		t.Fatalf("id %d, taken by a create, was released", id)
	}
}

// TestCheckOnlineOneAtATime: a second online check waits for the first
// instead of taking the pool's one metadata snapshot from it.
func TestCheckOnlineOneAtATime(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	var (
		wg                     sync.WaitGroup
		mu                     sync.Mutex
		reading, most, started int
	)
	second := make(chan error, 1)
	pool.mu.Lock()
	pool.onThinIDs = func() {
		mu.Lock()
		reading++
		most = max(most, reading)
		started++
		first := started == 1
		mu.Unlock()
		if first {
			wg.Go(func() {
				_, err := s.CheckOnline(ctx)
				second <- err
			})
			// Time for the second check to reach the pool, were it
			// not held back.
			time.Sleep(100 * time.Millisecond)
		}
		mu.Lock()
		reading--
		mu.Unlock()
	}
	pool.mu.Unlock()
	if _, err := s.CheckOnline(ctx); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if err := <-second; err != nil {
		t.Fatalf("second check: %v", err)
	}
	if most != 1 {
		t.Fatalf("%d checks read the metadata at once", most)
	}
}

// TestSelfCheckLoop: the goroutine checks after a recovery that did
// something and every CheckInterval, not after a recovery that did
// nothing, and Close stops it.
func TestSelfCheckLoop(t *testing.T) {
	ctx := context.Background()
	waitRun := func(t *testing.T, s *Snapshotter) CheckRun {
		t.Helper()
		for range 1000 {
			if c := s.lastCheck(); !c.Ended.IsZero() {
				return c
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatal("no self-check ran")
		return CheckRun{}
	}
	hourly := func(c *Config) { c.CheckInterval = time.Hour }

	// A removal a crash interrupted: the next start's recovery finishes
	// it, then the self-check runs at once.
	root, pool := t.TempDir(), newFakePool("tp")
	s := mustNew(t, root, pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	stopWorker(s)
	journalRemoval(t, s, "a")
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	// A clean start beside it, started first.
	quiet := mustNew(t, t.TempDir(), newFakePool("tq"), hourly)
	recovered := mustNew(t, root, pool, hourly)
	if run := waitRun(t, recovered); run.Trigger != CheckAfterRecovery || run.Error != "" || len(run.Findings) != 0 {
		t.Errorf("check after recovery: %+v", run)
	}
	if run := quiet.lastCheck(); !run.Ended.IsZero() {
		t.Errorf("a start without recovery work checked: %+v", run)
	}
	if st, err := recovered.Status(ctx); err != nil || st.CheckInterval != time.Hour {
		t.Errorf("Status.CheckInterval = %v, %v", st.CheckInterval, err)
	}

	// Every CheckInterval, after the end of the last check.
	fast := mustNew(t, t.TempDir(), newFakePool("tf"), func(c *Config) { c.CheckInterval = 10 * time.Millisecond })
	if run := waitRun(t, fast); run.Trigger != CheckPeriodic || run.Error != "" {
		t.Errorf("periodic check: %+v", run)
	}
	first := fast.lastCheck().Ended
	for range 1000 {
		if fast.lastCheck().Ended.After(first) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !fast.lastCheck().Ended.After(first) {
		t.Error("no second periodic check")
	}
	if err := fast.Close(); err != nil {
		t.Fatal(err)
	}
	stopped := fast.lastCheck().Ended
	time.Sleep(50 * time.Millisecond)
	if fast.lastCheck().Ended != stopped {
		t.Error("a check ran after Close")
	}
}

// A self-check that cannot check says why.
func TestSelfCheckError(t *testing.T) {
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	pool.mu.Lock()
	pool.hook = func(op string) error {
		if op == "status" {
			return unix.EIO
		}
		return nil
	}
	pool.mu.Unlock()
	run := s.selfCheck(context.Background(), CheckPeriodic)
	if !strings.Contains(run.Error, "status of pool tp") || run.Findings != nil || run.Ended.IsZero() {
		t.Fatalf("run: %+v", run)
	}
	// One that the snapshotter's stop cuts short is not kept.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if run := s.selfCheck(ctx, CheckPeriodic); !run.Ended.IsZero() {
		t.Errorf("check cut short: %+v", run)
	}
	if last := s.lastCheck(); !strings.Contains(last.Error, "status of pool tp") {
		t.Errorf("last check after one cut short: %+v", last)
	}
}

// A metadata snapshot a killed check left is released: checks are its
// only takers, one at a time.
func TestCheckReleasesStaleMetadataSnapshot(t *testing.T) {
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	pool.mu.Lock()
	pool.metaSnap = true
	pool.mu.Unlock()
	r, err := s.CheckOnline(context.Background())
	if err != nil || !r.Clean {
		t.Fatalf("check with a stale metadata snapshot: %+v, %v", r, err)
	}
	pool.mu.Lock()
	defer pool.mu.Unlock()
	if pool.metaSnap {
		t.Error("metadata snapshot held after the check")
	}
}

// TestSelfCheckDropsSettled: an operation in flight through both passes
// of the check (a slow create) is no finding once it has finished.
func TestSelfCheckDropsSettled(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	stopWorker(s)
	var e storage.Entry
	if err := s.db.Update(ctx, func(tx *storage.Tx) (err error) {
		if e.DeviceID, err = tx.AllocateID(); err != nil {
			return err
		}
		e.Op, e.Size = storage.OpCreateThin, 64<<20
		e.Seq, err = tx.AddJournal(e)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	reads := 0
	pool.mu.Lock()
	pool.onThinIDs = func() {
		// The create ends (here: rolled back) after the second pass
		// read the database.
		if reads++; reads == 2 {
			if err := s.undo(ctx, e, false); err != nil {
				t.Error(err)
			}
		}
	}
	pool.mu.Unlock()
	run := s.selfCheck(ctx, CheckPeriodic)
	if reads != 2 || run.Error != "" || len(run.Findings) != 0 {
		t.Fatalf("%d passes; run %+v", reads, run)
	}
}
