package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationActivateAhead: on the real kernel, a View of a layer
// activates its only committed child's device read-only, and the child's
// View mounts it and reads the child's content. A child removed while its
// device is being activated ahead leaves nothing behind.
func TestIntegrationActivateAhead(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	s := newEmbedded(t, testConfig(t.TempDir()))
	mnt := t.TempDir()
	parent := ""
	for _, l := range []string{"l1", "l2", "l3"} {
		if _, err := s.Prepare(ctx, l+"-a", parent); err != nil {
			t.Fatal(err)
		}
		withMounted(ctx, t, s, l+"-a", mnt, func() {
			if err := os.WriteFile(filepath.Join(mnt, "f"), []byte(l), 0o644); err != nil {
				t.Fatal(err)
			}
		})
		if err := s.Commit(ctx, l, l+"-a"); err != nil {
			t.Fatal(err)
		}
		parent = l
	}

	if _, err := s.View(ctx, "v1", "l1"); err != nil {
		t.Fatal(err)
	}
	if err := s.bg.activating.wait(ctx, "l2"); err != nil {
		t.Fatal(err)
	}
	l2, err := s.ready(ctx, "l2")
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.pool.Info(s.deviceName(l2.DeviceID)); err != nil || !info.LiveTable || !info.ReadOnly || info.OpenCount != 0 {
		t.Fatalf("l2's device after a view of l1: %+v, %v; want active, read-only, closed", info, err)
	}
	if r, err := s.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("check with a layer activated ahead: %+v, %v", r, err)
	}
	if _, err := s.View(ctx, "v2", "l2"); err != nil {
		t.Fatal(err)
	}
	withMounted(ctx, t, s, "v2", mnt, func() {
		if b, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(b) != "l2" {
			t.Errorf("file in l2's view: %q, %v", b, err)
		}
	})

	// v2 activates l3 ahead while l3 goes.
	if err := s.Remove(ctx, "l3"); err != nil {
		t.Fatal(err)
	}
	if err := s.bg.activating.wait(ctx, "l3"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"v1", "v2"} {
		if err := s.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if r, err := s.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("check after the views and l3 went: %+v, %v", r, err)
	}
}
