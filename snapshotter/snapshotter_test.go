package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// newFake opens a snapshotter on a fake pool; reopen with the same root and
// pool to test restarts.
func newFake(t *testing.T, root string, pool *fakePool, mod ...func(*Config)) (*Snapshotter, error) {
	t.Helper()
	ctx := context.Background()
	cfg := Config{Root: root, BaseSize: 64 << 20}
	for _, m := range mod {
		m(&cfg)
	}
	db, err := storage.Open(ctx, filepath.Join(root, dbFile), storage.WithNoSync())
	if err != nil {
		return nil, err
	}
	s, err := newWithPool(ctx, cfg, db, pool, func(context.Context, string) error { return nil })
	if err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// mustNewUnclosed is newFake for a test that crashes the snapshotter or
// closes it itself.
func mustNewUnclosed(t *testing.T, root string, pool *fakePool) *Snapshotter {
	t.Helper()
	s, err := newFake(t, root, pool)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustNew(t *testing.T, root string, pool *fakePool, mod ...func(*Config)) *Snapshotter {
	t.Helper()
	s, err := newFake(t, root, pool, mod...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// stopWorker stops s's background worker: nothing then finishes a removal
// or makes a warm device behind the test.
func stopWorker(s *Snapshotter) { s.stopBackground() }

// checkConsistent asserts the invariants that must hold whenever no call is
// in flight (and the worker has finished what a call handed it): the
// journal is empty, the pool holds exactly the base,
// the recorded devices and the warm ones, non-committed snapshots and warm
// devices are active (views read-only), committed ones are not unless
// their views share their device (then read-only), a warm
// device's parent is a committed snapshot, and the recorded transaction id
// is the pool's.
func checkConsistent(t *testing.T, s *Snapshotter, pool *fakePool) {
	t.Helper()
	ctx := context.Background()
	settle(t, s)
	var (
		want    = map[uint32]bool{}
		active  = map[uint32]bool{}
		entries []storage.Entry
		dbTx    uint64
	)
	err := s.db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		if err != nil {
			return err
		}
		want[pi.BaseDeviceID] = true
		if entries, err = tx.Journal(); err != nil {
			return err
		}
		warm, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		for _, w := range warm {
			p, err := tx.GetSnapshot(w.Parent)
			if err != nil || p.Kind != snapshots.KindCommitted || p.State != storage.StateReady {
				return fmt.Errorf("warm device %d of %q: parent %+v: %w", w.DeviceID, w.Parent, p, err)
			}
			if want[w.DeviceID] {
				return fmt.Errorf("warm device %d listed twice", w.DeviceID)
			}
			want[w.DeviceID], active[w.DeviceID] = true, false
		}
		if dbTx, err = tx.TransactionID(); err != nil {
			return err
		}
		// Layers that lost their last view keep their device, read-only,
		// until the worker deactivates it.
		s.bg.idleLayers.mu.Lock()
		idle := maps.Clone(s.bg.idleLayers.layers)
		s.bg.idleLayers.mu.Unlock()
		for k := range idle {
			if p, err := tx.GetSnapshot(k); err == nil {
				if _, ok := pool.active()[p.DeviceID]; ok {
					active[p.DeviceID] = true
				}
			}
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			if sn.State != storage.StateReady {
				return fmt.Errorf("record %q left in state %s", sn.Key, sn.State)
			}
			if sharesDevice(sn) {
				// Its layer's device, active and read-only.
				p, err := tx.GetSnapshot(sn.Parent)
				if err != nil {
					return err
				}
				active[p.DeviceID] = true
				return nil
			}
			if want[sn.DeviceID] {
				return fmt.Errorf("device %d recorded twice", sn.DeviceID)
			}
			want[sn.DeviceID] = true
			if sn.Kind != snapshots.KindCommitted {
				active[sn.DeviceID] = sn.Kind == snapshots.KindView
			}
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("journal not empty: %v", entries)
	}
	var wantIDs []uint32
	for id := range want {
		wantIDs = append(wantIDs, id)
	}
	slices.Sort(wantIDs)
	if got := pool.ids(); !slices.Equal(got, wantIDs) {
		t.Errorf("pool thin ids %v, records (and base) %v", got, wantIDs)
	}
	if got := pool.active(); fmt.Sprint(got) != fmt.Sprint(active) {
		t.Errorf("active devices %v, want %v", got, active)
	}
	pool.mu.Lock()
	for n, d := range pool.devices {
		if d.suspended {
			t.Errorf("device %s left suspended", n)
		}
	}
	pool.mu.Unlock()
	if dbTx != pool.txid {
		t.Errorf("database transaction id %d, pool %d", dbTx, pool.txid)
	}
}

// settle waits for the worker to finish the removals and warm devices a
// call handed it, and for the work begun ahead of calls: the journal is
// empty. It finishes nothing itself, so a
// call that leaves work no one was told about still fails the check.
// workerRound waits until the worker has run a whole round begun after
// the call: the wake channel holds one kick, so the third send goes
// through only once the worker took the second, after the first's round.
func workerRound(t *testing.T, s *Snapshotter) {
	t.Helper()
	for range 3 {
		select {
		case s.bg.wake <- struct{}{}:
		case <-time.After(30 * time.Second):
			t.Fatal("the worker takes no kick")
		}
	}
}

func settle(t *testing.T, s *Snapshotter) {
	t.Helper()
	for range 200 {
		pending := false
		if err := s.db.View(context.Background(), func(tx *storage.Tx) error {
			entries, err := tx.Journal()
			pending = len(entries) > 0
			return err
		}); err != nil {
			t.Fatal(err)
		}
		s.bg.removing.mu.Lock()
		busy := len(s.bg.removing.set) > 0
		s.bg.removing.mu.Unlock()
		s.bg.refill.mu.Lock()
		busy = busy || len(s.bg.refill.want) > 0 && s.bg.stop != nil
		s.bg.refill.mu.Unlock()
		for _, a := range []*aheads{&s.bg.ahead, &s.bg.activating} {
			a.making.mu.Lock()
			busy = busy || len(a.making.m) > 0
			a.making.mu.Unlock()
		}
		if !pending && !busy {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLifecycle(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			ctx := context.Background()
			pool := newFakePool("tp")
			s := mustNew(t, t.TempDir(), pool, func(c *Config) {
				c.FSType = fs
				c.MountOptions = []string{"noatime"}
			})
			checkConsistent(t, s, pool)

			m, err := s.Prepare(ctx, "a", "", snapshots.WithLabels(map[string]string{"l": "1"}))
			if err != nil {
				t.Fatal(err)
			}
			if len(m) != 1 || m[0].Type != fs || !strings.HasPrefix(m[0].Source, "/dev/mapper/"+dmsetup.DeviceNamePrefix("tp")) {
				t.Fatalf("mounts %+v", m)
			}
			wantOpts := []string{"noinit_itable", "noatime"}
			if fs == "xfs" {
				wantOpts = []string{"nouuid", "noatime"}
			}
			if !slices.Equal(m[0].Options, wantOpts) {
				t.Errorf("options %v, want %v", m[0].Options, wantOpts)
			}
			if strings.Contains(m[0].Source, "a") && !strings.HasPrefix(m[0].Source, "/dev/mapper/"+dmsetup.DeviceNamePrefix("tp")) {
				t.Errorf("device name built from the key: %s", m[0].Source)
			}
			pool.write(strings.TrimPrefix(m[0].Source, "/dev/mapper/"), 16)
			u, err := s.Usage(ctx, "a")
			if err != nil || u.Size != int64(dmsetup.Sectors(16).Bytes()) {
				t.Fatalf("usage of active = %+v, %v", u, err)
			}
			checkConsistent(t, s, pool)

			if err := s.Commit(ctx, "c", "a"); err != nil {
				t.Fatal(err)
			}
			if u, err := s.Usage(ctx, "c"); err != nil || u.Size != int64(dmsetup.Sectors(16).Bytes()) {
				t.Fatalf("usage of committed = %+v, %v", u, err)
			}
			if _, err := s.Mounts(ctx, "c"); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("Mounts(committed) = %v, want FailedPrecondition", err)
			}
			if _, err := s.Mounts(ctx, "a"); !errdefs.IsNotFound(err) {
				t.Errorf("Mounts(committed-away key) = %v, want NotFound", err)
			}
			if _, err := s.Mounts(ctx, "nope"); !errdefs.IsNotFound(err) {
				t.Errorf("Mounts(unknown) = %v, want NotFound", err)
			}
			checkConsistent(t, s, pool)

			v, err := s.View(ctx, "v", "c")
			if err != nil {
				t.Fatal(err)
			}
			if v[0].Options[0] != "ro" {
				t.Errorf("view options %v lack ro", v[0].Options)
			}
			mb, err := s.Prepare(ctx, "b", "c")
			if err != nil {
				t.Fatal(err)
			}
			// A child's usage excludes what it shares with its parent.
			if u, err := s.Usage(ctx, "b"); err != nil || u.Size != 0 {
				t.Errorf("usage of a fresh child = %+v, %v; want 0", u, err)
			}
			pool.write(strings.TrimPrefix(mb[0].Source, "/dev/mapper/"), 8)
			if u, err := s.Usage(ctx, "b"); err != nil || u.Size != int64(dmsetup.Sectors(8).Bytes()) {
				t.Errorf("usage of a child after writing 8 sectors = %+v, %v", u, err)
			}
			checkConsistent(t, s, pool)

			if err := s.Remove(ctx, "c"); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("Remove(parent) = %v, want FailedPrecondition", err)
			}
			for _, k := range []string{"v", "b", "c"} {
				if err := s.Remove(ctx, k); err != nil {
					t.Fatalf("Remove(%s): %v", k, err)
				}
			}
			checkConsistent(t, s, pool)
			if got := len(pool.ids()); got != 1 {
				t.Errorf("pool holds %d devices after removing everything, want the base only", got)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx, "v", ""); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		call func() error
		is   func(error) bool
	}{
		{"prepare existing", func() error { _, err := s.Prepare(ctx, "a", ""); return err }, errdefs.IsAlreadyExists},
		{"prepare missing parent", func() error { _, err := s.Prepare(ctx, "x", "nope"); return err }, errdefs.IsNotFound},
		{"prepare on active parent", func() error { _, err := s.Prepare(ctx, "x", "a"); return err }, errdefs.IsInvalidArgument},
		{"commit view", func() error { return s.Commit(ctx, "c", "v") }, errdefs.IsFailedPrecondition},
		{"commit unknown", func() error { return s.Commit(ctx, "c", "nope") }, errdefs.IsNotFound},
		{"commit onto existing name", func() error { return s.Commit(ctx, "v", "a") }, errdefs.IsAlreadyExists},
		{"remove unknown", func() error { return s.Remove(ctx, "nope") }, errdefs.IsNotFound},
		{"stat unknown", func() error { _, err := s.Stat(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"usage unknown", func() error { _, err := s.Usage(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"update kind", func() error {
			_, err := s.Update(ctx, snapshots.Info{Name: "a", Kind: snapshots.KindView}, "kind")
			return err
		}, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !tc.is(err) {
				t.Errorf("got %v", err)
			}
		})
	}
	checkConsistent(t, s, pool)
}

func TestRemoveBusy(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimPrefix(m[0].Source, "/dev/mapper/")
	pool.setOpen(dev, 1)
	if err := s.Remove(ctx, "a"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Remove(mounted) = %v, want FailedPrecondition", err)
	}
	if err := s.Commit(ctx, "c", "a"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Commit(mounted) = %v, want FailedPrecondition", err)
	}
	if _, err := s.Stat(ctx, "a"); err != nil {
		t.Fatalf("record lost after refused remove: %v", err)
	}
	checkConsistent(t, s, pool)
	pool.setOpen(dev, 0)
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
}

func TestAsyncRemove(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) { c.AsyncRemove = true })
	// Stop the worker: nothing else finishes a removal behind the test.
	stopWorker(s)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(ctx, "a"); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat after async remove = %v", err)
	}
	if n := len(pool.ids()); n != 2 {
		t.Fatalf("pool holds %d devices after Remove, want 2", n)
	}
	// The key is free at once.
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	// containerd's Cleanup ends its garbage collection: it only wakes the
	// worker, and does no kernel step itself.
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(pool.ids()); n != 3 {
		t.Fatalf("pool holds %d devices after Cleanup, want 3", n)
	}
	if err := s.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)

	// With the worker running, the removals finish without a call.
	s2 := mustNew(t, t.TempDir(), newFakePool("tp2"), func(c *Config) { c.AsyncRemove = true })
	if _, err := s2.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s2.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	settle(t, s2)
	checkConsistent(t, s2, s2.pool.(*fakePool))
}

// TestSyncRemoveCleanup: without async_remove, Cleanup finishes a removal
// a busy device deferred.
func TestSyncRemoveCleanup(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	stopWorker(s)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	// Busy between Remove's check and its deletion (udev probing it).
	pool.hook = func(op string) error {
		if op == "deactivate" {
			pool.hook = nil
			return unix.EBUSY
		}
		return nil
	}
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if n := len(pool.ids()); n != 2 {
		t.Fatalf("pool holds %d devices after a busy Remove, want 2", n)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
}

func TestInjectedFailures(t *testing.T) {
	ctx := context.Background()
	calls := []struct {
		name string
		run  func(s *Snapshotter) error
	}{
		{"prepare", func(s *Snapshotter) error { _, err := s.Prepare(ctx, "new", "c"); return err }},
		{"view", func(s *Snapshotter) error { _, err := s.View(ctx, "new", "c"); return err }},
		{"prepare-sized", func(s *Snapshotter) error {
			s.growFS = func(context.Context, string, string) error { return nil }
			_, err := s.Prepare(ctx, "new", "c", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: "1073741824"}))
			return err
		}},
		{"update-grow", func(s *Snapshotter) error {
			s.growFS = func(context.Context, string, string) error { return nil }
			_, err := s.Update(ctx, snapshots.Info{Name: "a", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: "1073741824"}})
			return err
		}},
		{"share-layer", func(s *Snapshotter) error {
			ref := map[string]string{snapshots.LabelSnapshotRef: "chain"}
			if _, err := s.Update(ctx, snapshots.Info{Name: "c", Labels: ref}); err != nil {
				return err
			}
			// Another parent than c's: a snapshot of c's device is made.
			if _, err := s.Prepare(ctx, "new", "c", snapshots.WithLabels(ref)); !errdefs.IsAlreadyExists(err) {
				return fmt.Errorf("share: %w", err)
			}
			return nil
		}},
		{"commit", func(s *Snapshotter) error { return s.Commit(ctx, "new", "a") }},
	}
	injected := 0
	for _, call := range calls {
		for step := 0; ; step++ {
			pool := newFakePool("tp")
			s := mustNew(t, t.TempDir(), pool)
			stopWorker(s) // no background work counted as the call's steps
			mustLayer(ctx, t, s, "c", "p", "")
			if _, err := s.Prepare(ctx, "a", "c"); err != nil {
				t.Fatal(err)
			}
			n := 0
			boom := errors.New("injected")
			pool.hook = func(op string) error {
				n++
				if n == step+1 {
					return boom
				}
				return nil
			}
			err := call.run(s)
			pool.hook = nil
			if n <= step {
				break // every step has failed once
			}
			injected++
			if err == nil {
				t.Errorf("%s with step %d failing: no error", call.name, step)
			}
			checkConsistent(t, s, pool)
			s.Close()
		}
	}
	if injected < 6 {
		t.Fatalf("only %d failure points exercised", injected)
	}
	t.Logf("%d injected failures", injected)
}

// crash is what a fake pool step panics with to stop a call where it is.
type crash struct{}

// TestCrashRecovery stops every call after each of its pool steps, as a
// kill -9 would, reopens, and checks that recovery restores the invariants.
func TestCrashRecovery(t *testing.T) {
	ctx := context.Background()
	calls := []struct {
		name string
		run  func(s *Snapshotter) error
	}{
		{"prepare", func(s *Snapshotter) error { _, err := s.Prepare(ctx, "new", "c"); return err }},
		{"prepare-base", func(s *Snapshotter) error { _, err := s.Prepare(ctx, "new", ""); return err }},
		{"view", func(s *Snapshotter) error { _, err := s.View(ctx, "new", "c"); return err }},
		{"prepare-sized", func(s *Snapshotter) error {
			s.growFS = func(context.Context, string, string) error { return nil }
			_, err := s.Prepare(ctx, "new", "c", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: "1073741824"}))
			return err
		}},
		{"update-grow", func(s *Snapshotter) error {
			s.growFS = func(context.Context, string, string) error { return nil }
			_, err := s.Update(ctx, snapshots.Info{Name: "a", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: "1073741824"}})
			return err
		}},
		{"share-layer", func(s *Snapshotter) error {
			ref := map[string]string{snapshots.LabelSnapshotRef: "chain"}
			if _, err := s.Update(ctx, snapshots.Info{Name: "c", Labels: ref}); err != nil {
				return err
			}
			// Another parent than c's: a snapshot of c's device is made.
			if _, err := s.Prepare(ctx, "new", "c", snapshots.WithLabels(ref)); !errdefs.IsAlreadyExists(err) {
				return fmt.Errorf("share: %w", err)
			}
			return nil
		}},
		{"commit", func(s *Snapshotter) error { return s.Commit(ctx, "new", "a") }},
		{"remove", func(s *Snapshotter) error { return s.Remove(ctx, "a") }},
		{"remove-committed", func(s *Snapshotter) error {
			if err := s.Remove(ctx, "a"); err != nil {
				return err
			}
			return s.Remove(ctx, "c")
		}},
	}
	points := 0
	for _, call := range calls {
		for step := 0; ; step++ {
			root := t.TempDir()
			pool := newFakePool("tp")
			s, err := newFake(t, root, pool)
			if err != nil {
				t.Fatal(err)
			}
			stopWorker(s) // no background removals racing the crash
			mustLayer(ctx, t, s, "c", "p", "")
			if _, err := s.Prepare(ctx, "a", "c"); err != nil {
				t.Fatal(err)
			}
			n := 0
			pool.hook = func(op string) error {
				n++
				if n == step+1 {
					panic(crash{})
				}
				return nil
			}
			crashed := func() (crashed bool) {
				defer func() {
					if r := recover(); r != nil {
						if _, ok := r.(crash); !ok {
							panic(r)
						}
						crashed = true
					}
				}()
				_ = call.run(s)
				return false
			}()
			pool.hook = nil
			// Abandon the process state: only the database file and the
			// pool survive.
			s.db.Close()
			if !crashed {
				break
			}
			points++
			s2, err := newFake(t, root, pool)
			if err != nil {
				t.Fatalf("%s crash after step %d: reopen: %v", call.name, step, err)
			}
			checkConsistent(t, s2, pool)
			// And it still works.
			if _, err := s2.Prepare(ctx, "after", ""); err != nil {
				t.Fatalf("%s crash after step %d: prepare after recovery: %v", call.name, step, err)
			}
			checkConsistent(t, s2, pool)
			s2.Close()
		}
	}
	if points < 10 {
		t.Fatalf("only %d crash points exercised", points)
	}
	t.Logf("%d crash points recovered", points)
}

// TestReactivateAfterReboot removes every dm device behind the
// snapshotter's back, as a reboot does, and expects them back on restart.
func TestReactivateAfterReboot(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	s := mustNewUnclosed(t, root, pool)
	mustLayer(ctx, t, s, "c", "p", "")
	if _, err := s.Prepare(ctx, "a", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	pool.devices = map[string]*fakeDev{}
	s2 := mustNew(t, root, pool)
	checkConsistent(t, s2, pool)
}

func TestOwnership(t *testing.T) {
	root := t.TempDir()
	pool := newFakePool("tp")
	pool.txid = 7 // used before, by someone else
	if _, err := newFake(t, root, pool); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "transaction id is 7") {
		t.Fatalf("foreign pool accepted: %v", err)
	}
	s, err := newFake(t, root, pool, func(c *Config) { c.AllowAdopt = true })
	if err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
	s.Close()

	// A re-created pool (transaction id back to 0) is refused too.
	fresh := newFakePool("tp")
	if _, err := newFake(t, root, fresh); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("re-created pool accepted: %v", err)
	}
	// Another pool name.
	other := newFakePool("other")
	other.txid = pool.txid
	if _, err := newFake(t, root, other); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "belongs to pool tp") {
		t.Fatalf("other pool accepted: %v", err)
	}
	// The right one reopens.
	s = mustNew(t, root, pool)
	checkConsistent(t, s, pool)
}

func TestParallel(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "p", "")
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 16 {
		wg.Go(func() {
			k := fmt.Sprintf("k%d", i)
			for j := range 10 {
				if _, err := s.Prepare(ctx, k, "c"); err != nil {
					errs <- err
					return
				}
				name := fmt.Sprintf("%s-%d", k, j)
				if err := s.Commit(ctx, name, k); err != nil {
					errs <- err
					return
				}
				if j%2 == 0 {
					if err := s.Remove(ctx, name); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	checkConsistent(t, s, pool)
}

// TestStaleRemovalEntry: a removal finished by one caller and then handed to
// another (the worker read the journal before it was cleared) must not
// delete the device that reused the freed id.
func TestStaleRemovalEntry(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	var e storage.Entry
	err := s.db.Update(ctx, func(tx *storage.Tx) error {
		removed, err := tx.RemoveSnapshot("a")
		if err != nil {
			return err
		}
		e = storage.Entry{Op: storage.OpDelete, DeviceID: removed.DeviceID, Key: "a"}
		e.Seq, err = tx.AddJournal(e)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.finishDelete(ctx, e); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "b", ""); err != nil {
		t.Fatal(err)
	}
	if info, _ := s.ready(ctx, "b"); info.DeviceID != e.DeviceID {
		t.Fatalf("freed id %d not reused (got %d): the test proves nothing", e.DeviceID, info.DeviceID)
	}
	if err := s.finishDelete(ctx, e); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
}

// aliasPool is a fake pool with other names, like an LVM pool.
type aliasPool struct {
	*fakePool
	aliases []string
}

func (p aliasPool) Aliases() []string { return p.aliases }

// TestPoolOwnership is the one rule the daemon (checkOwnership) and Check's
// repair (poolIsOurs) both apply.
func TestPoolOwnership(t *testing.T) {
	ours := storage.PoolInfo{Name: "tp"}
	for _, tc := range []struct {
		name     string
		pi       storage.PoolInfo
		dbTx     uint64
		pending  int
		pool     []string // its names; the first is Name()
		poolTx   uint64
		isNew    bool
		mismatch string // substring; "" for ours
	}{
		{name: "new database, unused pool", pool: []string{"tp"}, isNew: true},
		{name: "new database, used pool", pool: []string{"tp"}, poolTx: 3, mismatch: "transaction id is 3"},
		{name: "same ids", pi: ours, dbTx: 5, pool: []string{"tp"}, poolTx: 5},
		{name: "ahead by the pending entries", pi: ours, dbTx: 5, pending: 2, pool: []string{"tp"}, poolTx: 7},
		{name: "ahead by more", pi: ours, dbTx: 5, pending: 2, pool: []string{"tp"}, poolTx: 8, mismatch: "recorded 5 with 2 operations pending"},
		{name: "behind (re-created)", pi: ours, dbTx: 5, pool: []string{"tp"}, poolTx: 0, mismatch: "re-created"},
		{name: "another pool", pi: ours, dbTx: 5, pool: []string{"other"}, poolTx: 5, mismatch: "belongs to pool tp"},
		// An LVM pool recorded under its other dm name.
		{name: "recorded under an alias", pi: ours, dbTx: 5, pool: []string{"tp-lv", "tp-lv-tpool", "tp"}, poolTx: 5},
		{name: "not among the aliases", pi: ours, dbTx: 5, pool: []string{"tp-lv", "tp-lv-tpool"}, poolTx: 5, mismatch: "belongs to pool tp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			isNew, mismatch := poolOwnership(tc.pi, tc.dbTx, tc.pending, tc.pool, tc.poolTx)
			if isNew != tc.isNew || (tc.mismatch == "") != (mismatch == "") || !strings.Contains(mismatch, tc.mismatch) {
				t.Fatalf("poolOwnership = %v, %q; want %v, %q", isNew, mismatch, tc.isNew, tc.mismatch)
			}
			// Check repairs exactly the pools the daemon would use as they are.
			s := &Snapshotter{pool: aliasPool{newFakePool(tc.pool[0]), tc.pool}}
			journal := make([]storage.Entry, tc.pending)
			ok, _ := s.poolIsOurs(&checkState{pi: tc.pi, dbTx: tc.dbTx, poolTx: tc.poolTx, journal: journal})
			if ok != (!isNew && mismatch == "") {
				t.Fatalf("poolIsOurs = %v, daemon rule says new %v, mismatch %q", ok, isNew, mismatch)
			}
		})
	}
}

// TestTransactionIDMarksThePool: only setting the pool up (the base device)
// moves its transaction id, so a re-created pool (id 0) is told apart;
// snapshot calls send one pool message each, without a set_transaction_id
// (a second metadata commit).
func TestTransactionIDMarksThePool(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	set := pool.txid
	if set == 0 {
		t.Fatal("setting up the pool left its transaction id at 0")
	}
	mustLayer(ctx, t, s, "c", "a", "")
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "b", "c"); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"v", "b", "c"} {
		if err := s.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if pool.txid != set {
		t.Errorf("transaction id %d after snapshot calls, %d after set-up", pool.txid, set)
	}
	checkConsistent(t, s, pool)
}

// mustLayer prepares key on parent and commits it as name.
func mustLayer(ctx context.Context, t *testing.T, s snapshots.Snapshotter, name, key, parent string) {
	t.Helper()
	if _, err := s.Prepare(ctx, key, parent); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, name, key); err != nil {
		t.Fatal(err)
	}
}

// TestBaseSettingsChange: new base settings make a new base device, and
// the old one goes (thin snapshots do not need their origin): snapshots
// made from it stay, and check finds nothing left over.
func TestBaseSettingsChange(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	s := mustNew(t, root, pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	var old storage.PoolInfo
	_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { old, err = tx.PoolInfo(); return err })
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustNew(t, root, pool, func(c *Config) { c.BaseSize = 128 << 20 })
	var pi storage.PoolInfo
	_ = s.db.View(ctx, func(tx *storage.Tx) (err error) { pi, err = tx.PoolInfo(); return err })
	if pi.BaseDeviceID == old.BaseDeviceID || pi.BaseSize != 128<<20 {
		t.Fatalf("base %+v after the settings changed from %+v", pi, old)
	}
	if slices.Contains(pool.ids(), old.BaseDeviceID) {
		t.Errorf("old base %d still in the pool %v", old.BaseDeviceID, pool.ids())
	}
	if _, err := s.Mounts(ctx, "a"); err != nil {
		t.Errorf("a snapshot of the old base: %v", err)
	}
	checkConsistent(t, s, pool)
	if r, err := s.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("check after the base changed: %+v, %v", r, err)
	}
}
