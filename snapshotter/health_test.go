package snapshotter

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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

// TestPoolFault: a pool that takes no changes is refused with
// FailedPrecondition naming the pool and its mode as Status shows it.
func TestPoolFault(t *testing.T) {
	rw := dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW}
	for _, tc := range []struct {
		name string
		st   dmsetup.PoolStatus
		mode string // "": no fault
	}{
		{"rw", rw, ""},
		{"out of data space", dmsetup.PoolStatus{Mode: dmsetup.PoolModeOutOfDataSpace}, ""},
		{"read-only", dmsetup.PoolStatus{Mode: dmsetup.PoolModeRO}, ModeRO},
		{"needs check", dmsetup.PoolStatus{Mode: dmsetup.PoolModeRO, NeedsCheck: true}, ModeNeedsCheck},
		{"fail", dmsetup.PoolStatus{Fail: true}, ModeFail},
		{"error", dmsetup.PoolStatus{Error: true}, ModeFail},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := poolFault("tp", tc.st)
			if tc.mode == "" {
				if err != nil {
					t.Errorf("poolFault = %v, want nil", err)
				}
				return
			}
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "pool tp is in mode "+tc.mode+" ") {
				t.Errorf("poolFault = %v, want FailedPrecondition naming pool tp and mode %s", err, tc.mode)
			}
			if h := poolHealth("tp", tc.st, 5, 10); h == nil || h.Error() != err.Error() {
				t.Errorf("poolHealth = %v, want %v", h, err)
			}
		})
	}
}

// TestPoolFailsDuringCommit: the pool goes read-only with needs_check in
// the middle of a Commit (its create_snap fails; the kernel refuses every
// message after). The Commit fails with FailedPrecondition naming the pool
// and its mode, leaves the active snapshot as it was and its journal entry
// for later; every change after it is refused without journaling anything,
// lookups go on, and Status shows the mode. A start on the pool still
// faulty says the same. Once the pool is repaired, the start settles the
// entry and the commit can be made again.
func TestPoolFailsDuringCommit(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	s := mustNew(t, root, pool)
	stopWorker(s)
	mustLayer(ctx, t, s, "l", "l-active", "")
	for _, k := range []string{"build", "victim"} {
		if _, err := s.Prepare(ctx, k, "l"); err != nil {
			t.Fatal(err)
		}
	}
	faulted := false
	pool.hook = func(op string) error {
		switch {
		case op == "create_snap" && !faulted:
			// The kernel: the commit after the message failed.
			faulted = true
			pool.mu.Lock()
			pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRO, NeedsCheck: true}
			pool.mu.Unlock()
			return unix.EIO
		case faulted && slices.Contains([]string{"create_snap", "create_thin", "delete", "set_transaction_id"}, op):
			return unix.EOPNOTSUPP
		}
		return nil
	}
	refused := func(what string, err error) {
		t.Helper()
		if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "pool tp is in mode needs_check") {
			t.Errorf("%s: %v, want FailedPrecondition naming pool tp and mode needs_check", what, err)
		}
	}
	refused("Commit meeting the failure", s.Commit(ctx, "l2", "build"))
	journal := func() int {
		t.Helper()
		st, err := s.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.PendingJournal
	}
	if n := journal(); n != 1 {
		t.Fatalf("%d journal entries after the failed commit, want its own", n)
	}
	_, err := s.Prepare(ctx, "new", "l")
	refused("Prepare", err)
	_, err = s.View(ctx, "view", "l")
	refused("View", err)
	refused("Commit", s.Commit(ctx, "l3", "victim"))
	refused("Remove", s.Remove(ctx, "victim"))
	if n := journal(); n != 1 {
		t.Errorf("%d journal entries after refused calls, want 1", n)
	}
	for _, k := range []string{"build", "victim", "l"} {
		if _, err := s.Stat(ctx, k); err != nil {
			t.Errorf("Stat %s on the faulty pool: %v", k, err)
		}
	}
	if _, err := s.Stat(ctx, "l2"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat of the refused commit: %v", err)
	}
	if err := s.Commit(ctx, "x", "missing"); !errdefs.IsNotFound(err) {
		t.Errorf("Commit of a missing key on a faulty pool: %v, want NotFound", err)
	}
	if st, err := s.Status(ctx); err != nil || st.Mode != ModeNeedsCheck || !st.NeedsCheck {
		t.Errorf("Status: mode %q, needs_check %v, %v", st.Mode, st.NeedsCheck, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s2, err := newFake(t, root, pool); err == nil {
		s2.Close()
		t.Fatal("a start on the faulty pool settled its journal")
	} else {
		refused("start on the faulty pool", err)
	}

	// The operator repaired the pool: the kernel rolled the failed
	// commit back.
	pool.hook = nil
	pool.mu.Lock()
	pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW}
	pool.mu.Unlock()
	s = mustNew(t, root, pool)
	checkConsistent(t, s, pool)
	if err := s.Commit(ctx, "l2", "build"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "victim"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s, pool)
}

// TestPoolFailsDuringPrepare: the pool fails while a Prepare activates its
// device, which the kernel refuses with EINVAL. The error is the pool's
// FailedPrecondition alone, also over gRPC (where InvalidArgument would
// outrank it), and the Prepare leaves no record.
func TestPoolFailsDuringPrepare(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	stopWorker(s)
	pool.hook = func(op string) error {
		if op != "activate" {
			return nil
		}
		pool.mu.Lock()
		pool.status = dmsetup.PoolStatus{Fail: true}
		pool.mu.Unlock()
		return unix.EINVAL
	}
	_, err := s.Prepare(ctx, "a", "")
	if !errdefs.IsFailedPrecondition(err) || errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "pool tp is in mode fail") {
		t.Fatalf("Prepare on a pool failing meanwhile: %v, want only FailedPrecondition naming pool tp and mode fail", err)
	}
	if code := status.Code(errgrpc.ToGRPC(err)); code != codes.FailedPrecondition {
		t.Errorf("over gRPC: %v, want FailedPrecondition", code)
	}
	if _, err := s.Stat(ctx, "a"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat of the failed Prepare: %v", err)
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
