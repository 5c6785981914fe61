package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"
)

// TestViewsShareTheLayer: views of a layer share its read-only device,
// made by the first view; the device outlives the last view so the next
// view costs no kernel step, and the worker deactivates it later. A
// serving daemon's check finds nothing wrong meanwhile.
func TestViewsShareTheLayer(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "a", "")
	c, err := s.ready(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	layerDev := s.deviceName(c.DeviceID)

	ops := opsDuring(pool, func() {
		for _, v := range []string{"v1", "v2"} {
			m, err := s.View(ctx, v, "c")
			if err != nil {
				t.Fatal(err)
			}
			if m[0].Source != "/dev/mapper/"+layerDev {
				t.Errorf("view %s mounts %s, want the layer's %s", v, m[0].Source, layerDev)
			}
		}
	})
	if got := count(ops, "activate"); got != 1 || count(ops, "create_snap") != 0 {
		t.Errorf("two views made pool steps %v, want one activation", ops)
	}
	if info, err := pool.Info(layerDev); err != nil || !info.ReadOnly {
		t.Errorf("layer device %+v, %v: want active, read-only", info, err)
	}
	if u, err := s.Usage(ctx, "v1"); err != nil || u.Size != 0 {
		t.Errorf("usage of a view %+v, %v", u, err)
	}

	// The last view goes; the device waits for the next one.
	for _, v := range []string{"v1", "v2"} {
		if ops := opsDuring(pool, func() {
			if err := s.Remove(ctx, v); err != nil {
				t.Fatal(err)
			}
		}); count(ops, "deactivate") != 0 {
			t.Errorf("removing view %s: pool steps %v", v, ops)
		}
	}
	if _, err := pool.Info(layerDev); err != nil {
		t.Fatalf("layer device gone with its last view: %v", err)
	}
	if r, err := s.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("check with a layer device kept for its next view: %+v, %v", r, err)
	}
	if ops := opsDuring(pool, func() {
		if _, err := s.View(ctx, "v3", "c"); err != nil {
			t.Fatal(err)
		}
	}); count(ops, "activate") > 1 || count(ops, "create_snap") != 0 {
		t.Errorf("a view of a kept layer device: pool steps %v", ops)
	}
	if err := s.Remove(ctx, "v3"); err != nil {
		t.Fatal(err)
	}
	// Not yet idle long enough: kept.
	s.reclaimLayers(ctx, s.bg.idleLayers.pick(func(released time.Time, _ int) bool { return released.Before(time.Now().Add(-warmIdle)) }))
	if _, err := pool.Info(layerDev); err != nil {
		t.Fatalf("layer device deactivated before warmIdle: %v", err)
	}
	s.reclaimLayers(ctx, s.bg.idleLayers.pick(func(time.Time, int) bool { return true }))
	if _, err := pool.Info(layerDev); err == nil {
		t.Error("layer device left active after the worker reclaimed it")
	}
	checkConsistent(t, s, pool)
}

func count(ops []string, op string) int {
	n := 0
	for _, o := range ops {
		if o == op {
			n++
		}
	}
	return n
}

// TestActivateAhead: a View of a layer activates its only committed child's
// device, read-only, so the child's View makes no pool step; a layer with
// two committed children activates neither. The worker keeps at most
// maxWarm devices activated ahead and never viewed, and leaves the devices
// whose views went to its idle tick.
func TestActivateAhead(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	const n = maxWarm + 3
	parent := ""
	for i := range n {
		l := fmt.Sprintf("l%d", i)
		mustLayer(ctx, t, s, l, l+"-a", parent)
		parent = l
	}
	layerDev := func(key string) string {
		t.Helper()
		l, err := s.ready(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return s.deviceName(l.DeviceID)
	}
	if _, err := s.View(ctx, "v0", "l0"); err != nil {
		t.Fatal(err)
	}
	if err := s.bg.activating.wait(ctx, "l1"); err != nil {
		t.Fatal(err)
	}
	if info, err := pool.Info(layerDev("l1")); err != nil || !info.ReadOnly || !info.LiveTable {
		t.Fatalf("child's device %+v, %v: want active, read-only", info, err)
	}
	pool.mu.Lock()
	from := len(pool.steps)
	pool.mu.Unlock()
	if _, err := s.View(ctx, "v1", "l1"); err != nil {
		t.Fatal(err)
	}
	pool.mu.Lock()
	steps := slices.Clone(pool.steps[from:])
	pool.mu.Unlock()
	if slices.Contains(steps, "activate "+layerDev("l1")) {
		t.Errorf("view of a layer activated ahead activated it again: pool steps %v", steps)
	}
	checkConsistent(t, s, pool)

	// Views walk the rest of the chain and go. Their layers' devices wait
	// for the idle tick: removals of the layers often follow at once.
	for i := 2; i < n; i++ {
		v := fmt.Sprintf("v%d", i)
		if _, err := s.View(ctx, v, fmt.Sprintf("l%d", i)); err != nil {
			t.Fatal(err)
		}
		if err := s.bg.activating.wait(ctx, fmt.Sprintf("l%d", i+1)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		if err := s.Remove(ctx, fmt.Sprintf("v%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	active := func(keys ...string) []string {
		var out []string
		for _, k := range keys {
			if info, err := pool.Info(layerDev(k)); err == nil && info.ReadOnly {
				out = append(out, k)
			}
		}
		return out
	}
	var chain []string
	for i := range n {
		chain = append(chain, fmt.Sprintf("l%d", i))
	}
	workerRound(t, s)
	if got := active(chain...); len(got) != n {
		t.Errorf("layer devices whose views went: %v active after a worker round, want all %d", got, n)
	}
	checkConsistent(t, s, pool)

	// Layers activated ahead and never viewed: the worker keeps the newest
	// maxWarm.
	var tops []string
	for i := range n {
		b, top := fmt.Sprintf("b%d", i), fmt.Sprintf("t%d", i)
		mustLayer(ctx, t, s, b, b+"-a", "")
		mustLayer(ctx, t, s, top, top+"-a", b)
		if _, err := s.View(ctx, "v"+b, b); err != nil {
			t.Fatal(err)
		}
		if err := s.bg.activating.wait(ctx, top); err != nil {
			t.Fatal(err)
		}
		tops = append(tops, top)
	}
	for deadline := time.Now().Add(10 * time.Second); len(active(tops...)) > maxWarm && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if got := active(tops...); !slices.Equal(got, tops[n-maxWarm:]) {
		t.Errorf("layers activated ahead left active: %v, want the newest %d: %v", got, maxWarm, tops[n-maxWarm:])
	}
	if got := active(chain...); len(got) != n {
		t.Errorf("the bound on layers activated ahead deactivated layers whose views went: %v active, want all %d", got, n)
	}
	checkConsistent(t, s, pool)

	// Two committed children: neither is activated.
	mustLayer(ctx, t, s, "sib", "sib-a", "l0")
	s.reclaimLayers(ctx, s.bg.idleLayers.pick(func(time.Time, int) bool { return true }))
	settle(t, s)
	ops := opsDuring(pool, func() {
		if _, err := s.View(ctx, "w0", "l0"); err != nil {
			t.Fatal(err)
		}
		for _, l := range []string{"l1", "sib"} {
			if err := s.bg.activating.wait(ctx, l); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.bg.ahead.wait(ctx, "l0"); err != nil {
			t.Fatal(err)
		}
	})
	if count(ops, "activate") != count(ops, "create_snap")+1 {
		t.Errorf("view of a layer with two committed children: pool steps %v, want its own activation only", ops)
	}
	checkConsistent(t, s, pool)
}

// TestReclaimLayerRetried: a layer whose deactivation fails (the worker
// stopped midway) stays listed, so Close still deactivates its device.
func TestReclaimLayerRetried(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNewUnclosed(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "a", "")
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	c, err := s.ready(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	stopped, cancel := context.WithCancel(ctx)
	cancel()
	s.reclaimLayers(stopped, s.bg.idleLayers.pick(func(time.Time, int) bool { return true }))
	if n := s.bg.idleLayers.count(); n != 1 {
		t.Fatalf("%d layers listed after a failed deactivation, want 1", n)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Info(s.deviceName(c.DeviceID)); err == nil {
		t.Error("layer device left active after Close")
	}
}
