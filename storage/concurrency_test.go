package storage

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// TestConcurrentUpdates runs the snapshotter's create / commit / remove
// pattern from many goroutines with readers alongside; under -race this
// also checks the package shares no unsynchronized state.
func TestConcurrentUpdates(t *testing.T) {
	db, _ := openTestDB(t)
	ctx := context.Background()
	const workers, rounds = 8, 60
	var wg sync.WaitGroup
	errs := make(chan error, workers*2)
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				key := fmt.Sprintf("w%d-%d", w, i)
				var id uint32
				var seq uint64
				err := db.Update(ctx, func(tx *Tx) error {
					var err error
					if id, err = tx.AllocateID(); err != nil {
						return err
					}
					if _, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: active, State: StateCreating, DeviceID: id}); err != nil {
						return err
					}
					seq, err = tx.AddJournal(Entry{Op: OpCreateThin, DeviceID: id, Key: key})
					return err
				})
				if err == nil {
					err = db.Update(ctx, func(tx *Tx) error {
						if _, err := tx.SetState(key, StateReady); err != nil {
							return err
						}
						if err := tx.FinishJournal(seq); err != nil {
							return err
						}
						// The active's id goes back once the committed
						// snapshot has its own.
						if _, err := tx.commitFresh(key, key+"-c", snapshots.Usage{Size: int64(i)}); err != nil {
							return err
						}
						return tx.ReleaseID(id)
					})
				}
				// Every other round is removed again and its id released.
				if err == nil && i%2 == 1 {
					err = db.Update(ctx, func(tx *Tx) error {
						s, err := tx.RemoveSnapshot(key + "-c")
						if err != nil {
							return err
						}
						return tx.ReleaseID(s.DeviceID)
					})
				}
				if err != nil {
					errs <- fmt.Errorf("%s: %w", key, err)
					return
				}
			}
		})
		wg.Go(func() {
			for range rounds {
				err := db.View(ctx, func(tx *Tx) error {
					return tx.Walk(func(i snapshots.Info) error {
						if i.Kind != committed {
							return fmt.Errorf("walk saw %s of kind %v", i.Name, i.Kind)
						}
						_, err := tx.Stat(i.Name)
						return err
					})
				})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	view(t, db, func(tx *Tx) error {
		owners := map[uint32]string{}
		if err := tx.WalkIDs(func(id uint32, owner string) error { owners[id] = owner; return nil }); err != nil {
			return err
		}
		n := 0
		if err := tx.WalkSnapshots(func(s Snapshot) error {
			n++
			if owners[s.DeviceID] != s.Key {
				t.Errorf("%s has device %d owned by %q", s.Key, s.DeviceID, owners[s.DeviceID])
			}
			return nil
		}); err != nil {
			return err
		}
		if want := workers * rounds / 2; n != want || len(owners) != want {
			t.Errorf("%d records and %d ids, want %d", n, len(owners), want)
		}
		if j, _ := tx.Journal(); len(j) != 0 {
			t.Errorf("journal left: %v", j)
		}
		return nil
	})
}
