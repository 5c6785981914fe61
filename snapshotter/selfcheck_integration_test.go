//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationSelfCheck: on a real pool, while the snapshotter serves,
// the self-check finishes a removal left pending, releases an id leaked on
// purpose, leaves an orphan made behind its back for a person, and first
// drops the metadata snapshot a killed check left.
func TestIntegrationSelfCheck(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	s := newEmbedded(t, cfg)
	mustLayer(ctx, t, s, "c", "c-active", "")
	for _, key := range []string{"a", "lone"} {
		if _, err := s.Prepare(ctx, key, "c"); err != nil {
			t.Fatal(err)
		}
	}
	settle(t, s)
	// Nothing finishes the removal behind the test.
	stopWorker(s)
	lone := journalRemoval(t, s, "lone")
	leaked := allocateID(t, s)

	pool, err := LoopPoolName(root)
	if err != nil {
		t.Fatal(err)
	}
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const orphan = 900
	if err := c.CreateThin(pool, orphan); err != nil {
		t.Fatal(err)
	}
	if err := c.ReserveMetadataSnap(pool); err != nil {
		t.Fatal(err)
	}

	run := s.selfCheck(ctx, CheckPeriodic)
	t.Logf("self-check took %v: %+v", run.Duration, run.Findings)
	want := []string{
		fmt.Sprintf("pending_journal lone %d repaired", lone),
		fmt.Sprintf("orphan  %d -", orphan),
		fmt.Sprintf("leaked_id  %d repaired", leaked),
	}
	if got := runSummary(run.Findings); run.Error != "" || !slices.Equal(got, want) {
		t.Fatalf("self-check: error %q, findings\n got %q\nwant %q", run.Error, got, want)
	}
	if _, err := c.Info(s.deviceName(lone)); !dmsetup.IsNotFound(err) {
		t.Errorf("dm device of the removed snapshot: %v", err)
	}
	if idInUse(t, s, leaked) || idInUse(t, s, lone) {
		t.Errorf("ids in use: leaked %d %v, removed %d %v", leaked, idInUse(t, s, leaked), lone, idInUse(t, s, lone))
	}
	r, err := s.CheckOnline(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(r.PoolDevices, lone) || !slices.Contains(r.PoolDevices, orphan) ||
		!slices.Equal(summary(r.Findings), []string{fmt.Sprintf("orphan  %d", orphan)}) {
		t.Errorf("check after the self-check: pool %v, findings %q", r.PoolDevices, summary(r.Findings))
	}
	// The orphan was a person's to delete; then all is clean, and the
	// metadata snapshot is free.
	if err := c.DeleteThin(pool, orphan); err != nil {
		t.Fatal(err)
	}
	if run := s.selfCheck(ctx, CheckPeriodic); run.Error != "" || len(run.Findings) != 0 {
		t.Errorf("second self-check: %+v", run)
	}
	if err := c.ReserveMetadataSnap(pool); err != nil {
		t.Errorf("metadata snapshot still held: %v", err)
	} else if err := c.ReleaseMetadataSnap(pool); err != nil {
		t.Error(err)
	}
}
