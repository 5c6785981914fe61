package snapshotter

import (
	"context"
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
	s.reclaimLayers(ctx, func(released time.Time, _ int) bool { return released.Before(time.Now().Add(-warmIdle)) })
	if _, err := pool.Info(layerDev); err != nil {
		t.Fatalf("layer device deactivated before warmIdle: %v", err)
	}
	s.reclaimLayers(ctx, func(time.Time, int) bool { return true })
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
