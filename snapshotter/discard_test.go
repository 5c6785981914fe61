package snapshotter

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestDiscardOnDelete: a removed snapshot's blocks are discarded before
// its thin id is deleted, when DiscardOnDelete (by default: the embedded
// pool) says so: on its own activation when it is active and writable,
// else on one made for it; never for a device whose blocks another holds
// (a view, a warm device); a failing discard does not stop the removal.
func TestDiscardOnDelete(t *testing.T) {
	on, off := true, false
	embedded := func(*Config) {}
	tests := []struct {
		name    string
		subject string // "active", "view" or "committed"
		mod     func(*Config)
		failing bool
		want    string // pool ops of the removal, from the first discard or deactivation
	}{
		{name: "active, embedded pool default", subject: "active", mod: embedded,
			want: "discard deactivate delete"},
		{name: "active, existing pool default", subject: "active", mod: func(c *Config) { c.PoolName = "tp" },
			want: "deactivate delete"},
		{name: "active, existing pool on", subject: "active", mod: func(c *Config) { c.PoolName = "tp"; c.DiscardOnDelete = &on },
			want: "discard deactivate delete"},
		{name: "active, embedded pool off", subject: "active", mod: func(c *Config) { c.DiscardOnDelete = &off },
			want: "deactivate delete"},
		{name: "active, discard fails", subject: "active", mod: embedded, failing: true,
			want: "discard deactivate activate discard deactivate delete"},
		// A view shares its layer's device: its removal touches no
		// device (the worker deactivates the layer's later).
		{name: "view", subject: "view", mod: embedded,
			want: ""},
		// The warm device goes first, undiscarded: then the layer's
		// blocks are its own when it is discarded.
		{name: "committed with its warm device", subject: "committed", mod: embedded,
			want: "deactivate delete deactivate activate discard deactivate delete"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			pool := newFakePool("tp")
			s := mustNew(t, t.TempDir(), pool, tc.mod)
			mustLayer(ctx, t, s, "c", "a", "")
			key := "c"
			switch tc.subject {
			case "view":
				key = "v"
				_, err := s.View(ctx, key, "c")
				if err != nil {
					t.Fatal(err)
				}
			case "active":
				key = "w"
				if _, err := s.Prepare(ctx, key, "c"); err != nil {
					t.Fatal(err)
				}
			}
			snap, err := s.ready(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			pool.mu.Lock()
			if snap.DeviceID != 0 {
				pool.thins[snap.DeviceID] = 1234 // blocks of its own
			}
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
			if err := s.Remove(ctx, key); err != nil {
				t.Fatal(err)
			}
			pool.mu.Lock()
			ops := slices.Clone(pool.ops)
			pool.mu.Unlock()
			// Remove looks the device up first.
			got := ""
			if i := slices.IndexFunc(ops, func(op string) bool { return op == "discard" || op == "deactivate" }); i >= 0 {
				got = strings.Join(ops[i:], " ")
			}
			if got != tc.want {
				t.Errorf("removal ops %q, want %q", got, tc.want)
			}
			if snap.DeviceID != 0 && slices.Contains(pool.ids(), snap.DeviceID) {
				t.Errorf("device %d not deleted", snap.DeviceID)
			}
			checkConsistent(t, s, pool)
		})
	}
}
