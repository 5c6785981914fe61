package snapshotter

import (
	"context"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

func TestPoolHealth(t *testing.T) {
	ok := dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, UsedDataBlocks: 10, TotalDataBlocks: 100, UsedMetaBlocks: 10, TotalMetaBlocks: 100}
	with := func(f func(*dmsetup.PoolStatus)) dmsetup.PoolStatus { st := ok; f(&st); return st }
	for _, tc := range []struct {
		name string
		st   dmsetup.PoolStatus
		is   func(error) bool
	}{
		{"healthy", ok, nil},
		{"fail", dmsetup.PoolStatus{Fail: true}, errdefs.IsFailedPrecondition},
		{"error", dmsetup.PoolStatus{Error: true}, errdefs.IsFailedPrecondition},
		{"needs check", with(func(s *dmsetup.PoolStatus) { s.NeedsCheck = true }), errdefs.IsFailedPrecondition},
		{"read-only", with(func(s *dmsetup.PoolStatus) { s.Mode = dmsetup.PoolModeRO }), errdefs.IsFailedPrecondition},
		{"out of data space", with(func(s *dmsetup.PoolStatus) { s.Mode = dmsetup.PoolModeOutOfDataSpace }), errdefs.IsResourceExhausted},
		{"data below threshold", with(func(s *dmsetup.PoolStatus) { s.UsedDataBlocks = 96 }), errdefs.IsResourceExhausted},
		{"data at threshold", with(func(s *dmsetup.PoolStatus) { s.UsedDataBlocks = 95 }), nil},
		{"metadata below threshold", with(func(s *dmsetup.PoolStatus) { s.UsedMetaBlocks = 91 }), errdefs.IsResourceExhausted},
		{"no totals", dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := poolHealth("tp", tc.st, 5, 10)
			if tc.is == nil && err != nil || tc.is != nil && !tc.is(err) {
				t.Errorf("poolHealth = %v", err)
			}
		})
	}
}

// TestFullPoolRefusesNewDevices: below the threshold Prepare fails with
// ResourceExhausted, changes nothing, and existing snapshots keep working.
func TestFullPoolRefusesNewDevices(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) { c.MinFreeData = DefaultMinFreeData })
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, UsedDataBlocks: 99, TotalDataBlocks: 100, UsedMetaBlocks: 1, TotalMetaBlocks: 100}
	if _, err := s.Prepare(ctx, "b", ""); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("Prepare on a full pool = %v, want ResourceExhausted", err)
	}
	if _, err := s.Mounts(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
}

// TestFullPoolFinishesPendingRemovals: a Prepare short of space finishes
// the removals still waiting for the worker (their space comes back) before
// it refuses.
func TestFullPoolFinishesPendingRemovals(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) {
		c.MinFreeData = DefaultMinFreeData
		c.AsyncRemove = true
	})
	// Stop the worker: the removal stays pending.
	stopWorker(s)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	full := dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, UsedDataBlocks: 99, TotalDataBlocks: 100, UsedMetaBlocks: 1, TotalMetaBlocks: 100}
	pool.mu.Lock()
	pool.status = full
	pool.mu.Unlock()
	// Deleting a's device gives its blocks back.
	pool.hook = func(op string) error {
		if op == "delete" {
			pool.mu.Lock()
			pool.status.UsedDataBlocks = 50
			pool.mu.Unlock()
		}
		return nil
	}
	if _, err := s.Prepare(ctx, "b", ""); err != nil {
		t.Fatalf("Prepare with a removal pending on a full pool: %v", err)
	}
	pool.hook = nil
	checkConsistent(t, s, pool)

	// Nothing pending: refused.
	pool.mu.Lock()
	pool.status = full
	pool.mu.Unlock()
	if _, err := s.Prepare(ctx, "c", ""); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("Prepare on a full pool = %v, want ResourceExhausted", err)
	}
	checkConsistent(t, s, pool)
}
