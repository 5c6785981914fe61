package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// warmOf lists the warm devices by parent.
func warmOf(t *testing.T, s *Snapshotter) map[string][]uint32 {
	t.Helper()
	out := map[string][]uint32{}
	if err := s.db.View(context.Background(), func(tx *storage.Tx) error {
		warm, err := tx.WarmDevices()
		for _, w := range warm {
			out[w.Parent] = append(out[w.Parent], w.DeviceID)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// opsDuring returns the pool steps fn made.
func opsDuring(pool *fakePool, fn func()) []string {
	pool.mu.Lock()
	n := len(pool.ops)
	pool.mu.Unlock()
	fn()
	pool.mu.Lock()
	defer pool.mu.Unlock()
	return slices.Clone(pool.ops[n:])
}

// TestWarmHandOff: Commit keeps the active's device as a warm device of the
// layer and the layer's next Prepare takes it without a pool step; views,
// other parents and a second child do not.
func TestWarmHandOff(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	pool.write(strings.TrimPrefix(m[0].Source, "/dev/mapper/"), 16)
	ops := opsDuring(pool, func() {
		if err := s.Commit(ctx, "c", "a"); err != nil {
			t.Fatal(err)
		}
	})
	if slices.Contains(ops, "deactivate") || slices.Contains(ops, "activate") {
		t.Errorf("commit made pool steps %v, want no (de)activation", ops)
	}
	if u, err := s.Usage(ctx, "c"); err != nil || u.Size != 16*512 {
		t.Errorf("usage of committed = %+v, %v", u, err)
	}
	if w := warmOf(t, s); len(w["c"]) != 1 {
		t.Fatalf("warm devices %v, want one of c", w)
	}
	checkConsistent(t, s, pool)

	// Not for a view: its device must be read-only.
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if w := warmOf(t, s); len(w["c"]) != 1 {
		t.Fatalf("view took the warm device: %v", w)
	}
	var mb []string
	ops = opsDuring(pool, func() {
		got, err := s.Prepare(ctx, "b", "c")
		if err != nil {
			t.Fatal(err)
		}
		mb = []string{got[0].Source}
	})
	if ops = slices.DeleteFunc(ops, func(op string) bool { return op == "status" }); len(ops) != 0 {
		t.Errorf("prepare on a warm device made pool steps %v", ops)
	}
	if mb[0] != m[0].Source {
		t.Errorf("prepare got %s, want the warm device %s", mb[0], m[0].Source)
	}
	if u, err := s.Usage(ctx, "b"); err != nil || u.Size != 0 {
		t.Errorf("usage of a child on a warm device = %+v, %v; want 0", u, err)
	}
	pool.write(strings.TrimPrefix(mb[0], "/dev/mapper/"), 8)
	if u, err := s.Usage(ctx, "b"); err != nil || u.Size != 8*512 {
		t.Errorf("usage after writing 8 sectors = %+v, %v", u, err)
	}
	if w := warmOf(t, s); len(w) != 0 {
		t.Fatalf("warm devices left %v", w)
	}
	// A second child is made the slow way.
	ops = opsDuring(pool, func() {
		if _, err := s.Prepare(ctx, "b2", "c"); err != nil {
			t.Fatal(err)
		}
	})
	if !slices.Contains(ops, "activate") {
		t.Errorf("second child: pool steps %v", ops)
	}
	checkConsistent(t, s, pool)
}

// TestWarmAhead: a View of a layer without a warm device makes one at once,
// even with maxWarm devices of other layers waiting (the oldest goes), so
// the Prepare after it (a container of the viewed image) takes it without
// a pool step. Close waits for one still being made.
func TestWarmAhead(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	root := t.TempDir()
	s := mustNewUnclosed(t, root, pool)
	mustLayer(ctx, t, s, "c", "p", "")
	if _, err := s.Prepare(ctx, "first", "c"); err != nil { // takes c's warm device
		t.Fatal(err)
	}
	for i := range maxWarm {
		mustLayer(ctx, t, s, fmt.Sprintf("o%d", i), fmt.Sprintf("o%d-a", i), "")
	}
	if w := warmOf(t, s); len(w) != maxWarm || len(w["c"]) != 0 {
		t.Fatalf("warm devices %v, want one of each o", w)
	}
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.bg.ahead.wait(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	w := warmOf(t, s)
	if len(w["c"]) != 1 || len(w["o0"]) != 0 || len(w) != maxWarm {
		t.Fatalf("warm devices after the view %v, want one of c instead of o0's", w)
	}
	checkConsistent(t, s, pool)
	ops := opsDuring(pool, func() {
		if _, err := s.Prepare(ctx, "b", "c"); err != nil {
			t.Fatal(err)
		}
	})
	if count(ops, "create_snap") != 0 || count(ops, "activate") != 0 {
		t.Errorf("prepare after a view made pool steps %v", ops)
	}
	if d := snapOf(t, s, "b"); d.DeviceID != w["c"][0] {
		t.Errorf("prepare after the view got device %d, not the one made ahead %d", d.DeviceID, w["c"][0])
	}
	// A view of a layer that has a warm device makes none.
	ops = opsDuring(pool, func() {
		if _, err := s.View(ctx, "v1", "o1"); err != nil {
			t.Fatal(err)
		}
		if err := s.bg.ahead.wait(ctx, "o1"); err != nil {
			t.Fatal(err)
		}
	})
	if count(ops, "create_snap") != 0 {
		t.Errorf("view of a layer with a warm device: pool steps %v", ops)
	}

	// Closed while one is being made: Close waits for it, and the next
	// start finds nothing half made.
	mustLayer(ctx, t, s, "d", "d-a", "")
	if _, err := s.Prepare(ctx, "d-child", "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx, "v2", "d"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustNew(t, root, pool)
	checkConsistent(t, s, pool)
}

// TestWarmLifetime: the warm devices of a removed layer go with it, no more
// than maxWarm wait, containerd's Cleanup keeps them, Drain deletes them,
// and so does Close.
func TestWarmLifetime(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	root := t.TempDir()
	s := mustNewUnclosed(t, root, pool)
	commit := func(name string) {
		t.Helper()
		if _, err := s.Prepare(ctx, name+"-a", ""); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(ctx, name, name+"-a"); err != nil {
			t.Fatal(err)
		}
	}
	commit("x")
	if err := s.Remove(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if w := warmOf(t, s); len(w) != 0 {
		t.Fatalf("warm devices of a removed layer: %v", w)
	}
	checkConsistent(t, s, pool)

	for i := range maxWarm + 3 {
		commit(fmt.Sprintf("l%d", i))
	}
	checkConsistent(t, s, pool)
	w := warmOf(t, s)
	if len(w) != maxWarm || len(w["l0"]) != 0 || len(w[fmt.Sprintf("l%d", maxWarm+2)]) != 1 {
		t.Fatalf("warm devices %v: want the newest %d", w, maxWarm)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := warmOf(t, s); len(got) != maxWarm {
		t.Fatalf("warm devices after Cleanup: %v, want %v", got, w)
	}
	if err := s.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if w := warmOf(t, s); len(w) != 0 {
		t.Fatalf("warm devices after Drain: %v", w)
	}
	checkConsistent(t, s, pool)

	commit("y")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustNew(t, root, pool)
	if w := warmOf(t, s); len(w) != 0 {
		t.Fatalf("warm devices after Close: %v", w)
	}
	checkConsistent(t, s, pool)
}

// TestWarmAfterCrash: warm devices a crash leaves behind are deleted at the
// next start, and a busy one is not handed out.
func TestWarmAfterCrash(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	root := t.TempDir()
	s := mustNewUnclosed(t, root, pool)
	stopWorker(s)
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	// Someone opened the warm device behind our back: not handed out.
	dev := strings.TrimPrefix(m[0].Source, "/dev/mapper/")
	pool.setOpen(dev, 1)
	if mb, err := s.Prepare(ctx, "b", "c"); err != nil || mb[0].Source == m[0].Source {
		t.Fatalf("prepare = %v, %v: handed out an open warm device", mb, err)
	}
	pool.setOpen(dev, 0)
	s.db.Close() // crash: no Close
	s2 := mustNew(t, root, pool)
	if w := warmOf(t, s2); len(w) != 0 {
		t.Fatalf("warm devices after the restart: %v", w)
	}
	if _, ok := pool.active()[idOfDev(t, dev)]; ok {
		t.Errorf("warm device %s still active after the restart", dev)
	}
	checkConsistent(t, s2, pool)
	if err := s2.Remove(ctx, "c"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Remove(parent of b) = %v", err)
	}
}

func idOfDev(t *testing.T, dev string) uint32 {
	t.Helper()
	var id uint32
	if _, err := fmt.Sscanf(dev, "tp-snap-%d", &id); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestWarmRefillPastBound: a layer whose children keep coming gets its
// refill even with maxWarm devices of other layers waiting, which unpacks
// left; the oldest goes, and the next child takes the refill.
func TestWarmRefillPastBound(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "p", "")
	if _, err := s.Prepare(ctx, "a", "c"); err != nil { // takes c's warm device
		t.Fatal(err)
	}
	for i := range maxWarm {
		mustLayer(ctx, t, s, fmt.Sprintf("o%d", i), fmt.Sprintf("o%d-a", i), "")
	}
	if _, err := s.Prepare(ctx, "b", "c"); err != nil { // a miss
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
	w := warmOf(t, s)
	if len(w["c"]) != 1 || len(w["o0"]) != 0 || len(w) != maxWarm {
		t.Fatalf("warm devices %v, want one of c instead of o0's", w)
	}
	ops := opsDuring(pool, func() {
		if _, err := s.Prepare(ctx, "d", "c"); err != nil {
			t.Fatal(err)
		}
	})
	if count(ops, "create_snap") != 0 || count(ops, "activate") != 0 {
		t.Errorf("prepare after the refill made pool steps %v", ops)
	}
	if d := snapOf(t, s, "d"); d.DeviceID != w["c"][0] {
		t.Errorf("prepare after the refill got device %d, not the warm %d", d.DeviceID, w["c"][0])
	}
	checkConsistent(t, s, pool)
}

// TestWarmRefill: a Prepare that found no warm device has the worker make
// one for the next child; a crash at any step of making it is recovered.
func TestWarmRefill(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "p", "")
	for _, k := range []string{"a", "b"} { // the warm one, then a miss
		if _, err := s.Prepare(ctx, k, "c"); err != nil {
			t.Fatal(err)
		}
	}
	checkConsistent(t, s, pool)
	w := warmOf(t, s)
	if len(w["c"]) != 1 {
		t.Fatalf("warm devices %v, want one of c made after the miss", w)
	}
	// The worker may be making c's next warm device meanwhile (below), so
	// d's device tells, not the pool's steps.
	if _, err := s.Prepare(ctx, "d", "c"); err != nil {
		t.Fatal(err)
	}
	if d := snapOf(t, s, "d"); d.DeviceID != w["c"][0] {
		t.Errorf("prepare after the refill got device %d, not the warm %d", d.DeviceID, w["c"][0])
	}
	// d, c's third child, took the warm device: c has children, the next
	// container finds one too.
	checkConsistent(t, s, pool)
	if w := warmOf(t, s); len(w["c"]) != 1 {
		t.Fatalf("warm devices %v, want the next one of c after a take by its third child", w)
	}
	// A layer's first child (an unpack's next layer) takes the commit's
	// warm device and nothing is made ahead for it.
	if err := s.Commit(ctx, "c2", "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "e", "c2"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
	if w := warmOf(t, s); len(w["c2"]) != 0 {
		t.Fatalf("warm devices %v: one made for c2 after its first child", w)
	}

	points := 0
	for step := 0; ; step++ {
		root := t.TempDir()
		pool := newFakePool("tp")
		s, err := newFake(t, root, pool)
		if err != nil {
			t.Fatal(err)
		}
		stopWorker(s)
		mustLayer(ctx, t, s, "c", "p", "")
		if err := s.Drain(ctx); err != nil { // no warm device of c
			t.Fatal(err)
		}
		n := 0
		pool.hook = func(string) error {
			if n++; n == step+1 {
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
			if err := s.makeWarm(ctx, "c", false); err != nil {
				t.Fatal(err)
			}
			return false
		}()
		pool.hook = nil
		s.db.Close()
		if !crashed {
			if len(warmOf(t, mustNew(t, root, pool))) != 0 {
				t.Error("warm device survived a restart")
			}
			break
		}
		points++
		s2 := mustNew(t, root, pool)
		checkConsistent(t, s2, pool)
	}
	if points < 3 {
		t.Fatalf("only %d crash points", points)
	}
}

// snapOf reads the record of key.
func snapOf(t *testing.T, s *Snapshotter, key string) storage.Snapshot {
	t.Helper()
	var snap storage.Snapshot
	if err := s.db.View(context.Background(), func(tx *storage.Tx) (err error) {
		snap, err = tx.GetSnapshot(key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return snap
}
