package snapshotter

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// prepared makes active snapshot key with sectors written to its device.
func prepared(ctx context.Context, t *testing.T, s *Snapshotter, pool *fakePool, key string, sectors dmsetup.Sectors) {
	t.Helper()
	m, err := s.Prepare(ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	pool.write(strings.TrimPrefix(m[0].Source, "/dev/mapper/"), sectors)
}

// TestCommitCutAfterRecord: a commit whose record is written but whose
// device the process never made (commitAtOnce writes both at once) is
// finished by the next start, from the warm device that holds the
// committed content.
func TestCommitCutAfterRecord(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	root := t.TempDir()
	s := mustNewUnclosed(t, root, pool)
	stopWorker(s)
	prepared(ctx, t, s, pool, "a", 24)
	pool.hook = func(op string) error {
		if op != "create_snap" {
			return nil
		}
		// Crash once the record is durable, before the device.
		for {
			var err error
			if verr := s.db.View(ctx, func(tx *storage.Tx) error {
				_, err = tx.GetSnapshot("c")
				return nil
			}); verr != nil {
				t.Error(verr)
				panic(crash{})
			}
			if err == nil {
				panic(crash{})
			}
			time.Sleep(time.Millisecond)
		}
	}
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Fatal("commit did not reach the pool")
			} else if _, ok := r.(crash); !ok {
				panic(r)
			}
		}()
		_ = s.Commit(ctx, "c", "a")
	}()
	pool.hook = nil
	s.db.Close()

	s2 := mustNew(t, root, pool)
	st, err := s2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.LastRecovery.FinishedCommits != 1 {
		t.Errorf("recovery %+v, want one finished commit", st.LastRecovery)
	}
	checkConsistent(t, s2, pool)
	if u, err := s2.Usage(ctx, "c"); err != nil || u.Size != 24*512 {
		t.Errorf("usage of the finished commit = %+v, %v", u, err)
	}
	c := snapOf(t, s2, "c")
	if got := pool.thins[c.DeviceID]; got != 24 {
		t.Errorf("device of c maps %d sectors, want the active's 24", got)
	}
	if _, err := s2.Prepare(ctx, "b", "c"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, s2, pool)
}

// TestCommitRefusedAfterRecord: when the pool refuses the committed
// snapshot's device after its record is written, the record is undone:
// the active snapshot is back with its device and content, and commits
// again.
func TestCommitRefusedAfterRecord(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	prepared(ctx, t, s, pool, "a", 16)
	before := snapOf(t, s, "a")
	refused := errors.New("refused")
	pool.hook = func(op string) error {
		if op == "create_snap" {
			return refused
		}
		return nil
	}
	if err := s.Commit(ctx, "c", "a", snapshots.WithLabels(map[string]string{"l": "v"})); !errors.Is(err, refused) {
		t.Fatalf("Commit = %v, want the pool's refusal", err)
	}
	pool.hook = nil
	if _, err := s.Stat(ctx, "c"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat(c) after a refused commit = %v", err)
	}
	after := snapOf(t, s, "a")
	if after.Kind != snapshots.KindActive || after.DeviceID != before.DeviceID || after.Parent != before.Parent || after.CommitID == 0 {
		t.Errorf("active after a refused commit %+v, was %+v", after, before)
	}
	if w := warmOf(t, s); len(w) != 0 {
		t.Errorf("warm devices after a refused commit: %v", w)
	}
	checkConsistent(t, s, pool)
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if u, err := s.Usage(ctx, "c"); err != nil || u.Size != 16*512 {
		t.Errorf("usage after the second commit = %+v, %v", u, err)
	}
	checkConsistent(t, s, pool)
}

// TestCommitHoldsItsName: while a Commit makes name's device, Prepares and
// Views of name and Remove of name wait for it.
func TestCommitHoldsItsName(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "a", "")
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"prepare", func() error { _, err := s.Prepare(ctx, "p", "c"); return err }},
		{"view", func() error { _, err := s.View(ctx, "v", "c"); return err }},
		{"remove", func() error { return s.Remove(ctx, "c") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			done, ok := s.bg.committing.start("c")
			if !ok {
				t.Fatal("c is being committed already")
			}
			ended := make(chan error, 1)
			go func() { ended <- tc.call() }()
			select {
			case err := <-ended:
				done()
				t.Fatalf("%s ended (%v) while c's commit ran", tc.name, err)
			case <-time.After(50 * time.Millisecond):
			}
			done()
			if err := <-ended; err != nil && !errdefs.IsFailedPrecondition(err) {
				t.Fatal(err)
			}
		})
	}
	checkConsistent(t, s, pool)
}
