package storage

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// outcome is what an Update returned, or the value it panicked with.
type outcome struct {
	err      error
	panicked any
}

// goUpdate runs fn as an Update in a goroutine of its own.
func goUpdate(db *DB, fn func(tx *Tx) error) <-chan outcome {
	out := make(chan outcome, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				out <- outcome{panicked: p}
			}
		}()
		out <- outcome{err: db.Update(context.Background(), fn)}
	}()
	return out
}

// waitQueued waits until n Updates wait behind the commit under way.
func waitQueued(t *testing.T, db *DB, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		db.group.mu.Lock()
		k := len(db.group.queue)
		db.group.mu.Unlock()
		if k == n {
			return
		}
	}
	t.Fatalf("%d updates never queued", n)
}

// TestGroupCommit: Updates that wait for a commit under way are committed
// together, in the order they queued; one that fails or panics gets its
// own outcome and changes nothing, and the others commit without it.
func TestGroupCommit(t *testing.T) {
	errRefused := errors.New("refused")
	type call struct {
		name string
		// fail: the callback writes its record, then returns this error.
		fail error
		// panics: the callback writes its record, then panics.
		panics bool
	}
	for _, tc := range []struct {
		name  string
		calls []call
	}{
		{"all commit", []call{{name: "a"}, {name: "b"}, {name: "c"}}},
		{"one fails", []call{{name: "a"}, {name: "b", fail: errRefused}, {name: "c"}}},
		{"the first fails", []call{{name: "a", fail: errRefused}, {name: "b"}, {name: "c"}}},
		{"two fail", []call{{name: "a", fail: errRefused}, {name: "b"}, {name: "c", fail: errRefused}}},
		{"one panics", []call{{name: "a"}, {name: "b", panics: true}, {name: "c"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, _ := openTestDB(t)
			// The first Update commits alone and holds the group open
			// until released; the calls queue behind it.
			started, release := make(chan struct{}), make(chan struct{})
			var firstTx int
			first := goUpdate(db, func(tx *Tx) error {
				firstTx = tx.tx.ID()
				close(started)
				<-release
				_, err := tx.CreateSnapshot(Snapshot{Key: "first", Kind: active, State: StateReady})
				return err
			})
			<-started
			var (
				mu   sync.Mutex
				txs  = map[string]int{}      // the transaction of each call's last run
				seen = map[string][]string{} // what each call's last run saw
			)
			var outs []<-chan outcome
			for i, c := range tc.calls {
				outs = append(outs, goUpdate(db, func(tx *Tx) error {
					var before []string
					for _, o := range tc.calls {
						if _, err := tx.GetSnapshot(o.name); err == nil {
							before = append(before, o.name)
						}
					}
					mu.Lock()
					txs[c.name], seen[c.name] = tx.tx.ID(), before
					mu.Unlock()
					if _, err := tx.CreateSnapshot(Snapshot{Key: c.name, Kind: active, State: StateReady}); err != nil {
						return err
					}
					if c.panics {
						panic("callback " + c.name)
					}
					return c.fail
				}))
				waitQueued(t, db, i+1)
			}
			close(release)
			if o := <-first; o.err != nil || o.panicked != nil {
				t.Fatalf("first update: %+v", o)
			}
			var committed []string
			for i, c := range tc.calls {
				o := <-outs[i]
				switch {
				case c.panics:
					if o.panicked != "callback "+c.name {
						t.Errorf("%s: outcome %+v, want its panic raised in its caller", c.name, o)
					}
				case c.fail != nil:
					if !errors.Is(o.err, c.fail) {
						t.Errorf("%s: error %v, want %v", c.name, o.err, c.fail)
					}
				case o.err != nil || o.panicked != nil:
					t.Errorf("%s: outcome %+v, want committed", c.name, o)
				default:
					committed = append(committed, c.name)
				}
			}
			view(t, db, func(tx *Tx) error {
				for _, c := range tc.calls {
					_, err := tx.GetSnapshot(c.name)
					if want := slices.Contains(committed, c.name); want != (err == nil) {
						t.Errorf("%s: record found %v, want %v (%v)", c.name, err == nil, want, err)
					}
					if err != nil && !errdefs.IsNotFound(err) {
						t.Error(err)
					}
				}
				return nil
			})
			// The committed calls ran last in one transaction after the
			// first's, each seeing those committed before it.
			for i, name := range committed {
				if txs[name] != txs[committed[0]] || txs[name] == firstTx {
					t.Errorf("%s committed in transaction %d, want %d (the first's was %d)", name, txs[name], txs[committed[0]], firstTx)
				}
				if !slices.Equal(seen[name], committed[:i]) {
					t.Errorf("%s saw %v, want %v", name, seen[name], committed[:i])
				}
			}
		})
	}
}

// TestGroupCommitConcurrent: many writers at once, each reading its own
// write back after its Update returns.
func TestGroupCommitConcurrent(t *testing.T) {
	db, _ := openTestDB(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := range 40 {
				key := fmt.Sprintf("w%d-%d", w, i)
				err := db.Update(ctx, func(tx *Tx) error {
					if i%7 == 3 {
						return errRefusedForTest
					}
					_, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: active, State: StateReady})
					return err
				})
				if i%7 == 3 {
					if !errors.Is(err, errRefusedForTest) {
						t.Errorf("%s: %v, want its own error", key, err)
					}
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				if err := db.View(ctx, func(tx *Tx) error { _, err := tx.GetSnapshot(key); return err }); err != nil {
					t.Errorf("%s after its update: %v", key, err)
				}
			}
		})
	}
	wg.Wait()
}

var errRefusedForTest = errors.New("refused")
