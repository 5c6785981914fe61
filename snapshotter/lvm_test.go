package snapshotter

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// An LVM pool whose dm name changes (a thin volume added: vg-lv becomes
// vg-lv-tpool) stays the database's pool, and its devices keep the names
// they were given: built from the recorded name, not today's.
func TestPoolRenamedKeepsDeviceNames(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("vg-lv")
	s := mustNew(t, root, pool)
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(m[0].Source, "/dev/mapper/vg-lv-snap-") {
		t.Fatalf("source %s", m[0].Source)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	open := func(p thinPool) (*Snapshotter, error) {
		db, err := storage.Open(ctx, filepath.Join(root, dbFile), storage.WithNoSync())
		if err != nil {
			t.Fatal(err)
		}
		s, err := newWithPool(ctx, Config{Root: root, BaseSize: 64 << 20}, db, p, func(context.Context, string) error { return nil })
		if err != nil {
			db.Close()
		}
		return s, err
	}
	// Not an alias: another pool.
	pool.name = "vg-other"
	if _, err := open(pool); err == nil || !strings.Contains(err.Error(), "belongs to pool vg-lv") {
		t.Fatalf("a pool under another name was accepted: %v", err)
	}
	// The same pool under its other name; a reboot took the devices.
	pool.name = "vg-lv-tpool"
	pool.devices = map[string]*fakeDev{}
	s2, err := open(aliasPool{pool, []string{"vg-lv-tpool", "vg-lv"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	// (checkConsistent would look for devices under the fake's new name.)
	if _, ok := pool.devices[strings.TrimPrefix(m[0].Source, "/dev/mapper/")]; !ok {
		t.Fatalf("%s was not reactivated under its name: %v", m[0].Source, pool.devices)
	}
	for name := range pool.devices {
		if !strings.HasPrefix(name, "vg-lv-snap-") {
			t.Errorf("device %s is not named after the recorded pool", name)
		}
	}
	m2, err := s2.Mounts(ctx, "a")
	if err != nil || m2[0].Source != m[0].Source {
		t.Fatalf("mounts of a: %v, %v; want source %s", m2, err, m[0].Source)
	}
	if _, err := s2.Prepare(ctx, "b", ""); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}

	// Check, offline, names the devices the same way: all clean.
	db, err := storage.Open(ctx, filepath.Join(root, dbFile), storage.WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	c, err := openCheck(ctx, Config{Root: root, BaseSize: 64 << 20}, db, aliasPool{pool, []string{"vg-lv-tpool", "vg-lv"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Check(ctx, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean {
		t.Fatalf("check findings: %+v", r.Findings)
	}
}

// Adopting a pool that holds someone else's thin devices (an LVM pool with
// LVM thin volumes): the base device's create finds id 1 taken, records it
// as foreign and moves on to id 2; that device is left alone, never deleted
// as if it were ours.
func TestAdoptKeepsForeignDevices(t *testing.T) {
	pool := newFakePool("vg-lv-tpool")
	pool.thins[1] = 1 << 20 // LVM's first thin volume
	pool.txid = 1
	s := mustNew(t, t.TempDir(), pool, func(c *Config) { c.AllowAdopt = true })
	if _, ok := pool.thins[1]; !ok {
		t.Fatal("the foreign thin device 1 was deleted")
	}
	if ids := foreignIDs(t, s.db); !slices.Equal(ids, []uint32{1}) {
		t.Errorf("foreign ids %v, want [1]", ids)
	}
	var base uint32
	if err := s.db.View(context.Background(), func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		base = pi.BaseDeviceID
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if base != 2 {
		t.Errorf("base device id %d, want 2", base)
	}
}
