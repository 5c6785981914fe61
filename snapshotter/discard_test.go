package snapshotter

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestDiscardOnDelete: a removed snapshot's device is activated writable
// and discarded before its thin id is deleted, when DiscardOnDelete (by
// default: the embedded pool) says so; a failing discard does not stop the
// removal.
func TestDiscardOnDelete(t *testing.T) {
	on, off := true, false
	tests := []struct {
		name       string
		mod        func(*Config)
		failing    bool
		wantRemove string // pool ops of removing a view, from its deactivation
	}{
		{name: "embedded pool default", mod: func(*Config) {},
			wantRemove: "deactivate activate discard deactivate delete"},
		{name: "existing pool default", mod: func(c *Config) { c.PoolName = "tp" },
			wantRemove: "deactivate delete"},
		{name: "existing pool on", mod: func(c *Config) { c.PoolName = "tp"; c.DiscardOnDelete = &on },
			wantRemove: "deactivate activate discard deactivate delete"},
		{name: "embedded pool off", mod: func(c *Config) { c.DiscardOnDelete = &off },
			wantRemove: "deactivate delete"},
		{name: "discard fails", mod: func(*Config) {}, failing: true,
			wantRemove: "deactivate activate discard deactivate delete"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			pool := newFakePool("tp")
			s := mustNew(t, t.TempDir(), pool, tc.mod)
			if _, err := s.Prepare(ctx, "a", ""); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(ctx, "c", "a"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.View(ctx, "v", "c"); err != nil {
				t.Fatal(err)
			}
			v, err := s.ready(ctx, "v")
			if err != nil {
				t.Fatal(err)
			}
			pool.mu.Lock()
			pool.thins[v.DeviceID] = 1234 // blocks of its own
			if tc.failing {
				pool.hook = func(op string) error {
					if op == "discard" {
						return errors.New("injected")
					}
					return nil
				}
			}
			pool.ops = nil
			pool.mu.Unlock()
			if err := s.Remove(ctx, "v"); err != nil {
				t.Fatal(err)
			}
			pool.mu.Lock()
			ops := slices.Clone(pool.ops)
			pool.mu.Unlock()
			// Remove looks the device up first.
			i := slices.Index(ops, "deactivate")
			if i < 0 {
				t.Fatalf("ops %v", ops)
			}
			if got := strings.Join(ops[i:], " "); got != tc.wantRemove {
				t.Errorf("removal ops %q, want %q", got, tc.wantRemove)
			}
			if slices.Contains(pool.ids(), v.DeviceID) {
				t.Errorf("device %d not deleted", v.DeviceID)
			}
			checkConsistent(t, s, pool)
		})
	}
}
