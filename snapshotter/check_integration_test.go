package snapshotter

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// TestIntegrationCheck damages a stopped snapshotter's pool, dm devices and
// database behind its back, one problem of each kind, and expects check to
// name exactly those, repair them, and leave a state the daemon serves.
func TestIntegrationCheck(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	s := newEmbedded(t, cfg)
	mnt := t.TempDir()
	writeFile := func(s *Snapshotter, key, content string) {
		t.Helper()
		m, err := s.Mounts(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if err := mount.All(m, mnt); err != nil {
			t.Fatal(err)
		}
		err = os.WriteFile(filepath.Join(mnt, "f"), []byte(content), 0o644)
		if uerr := mount.UnmountAll(mnt, 0); err == nil {
			err = uerr
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, step := range []func() error{
		func() error { _, err := s.Prepare(ctx, "a", ""); return err },
		func() error { _, err := s.Prepare(ctx, "c-active", ""); return err },
		func() error { writeFile(s, "c-active", "c"); return nil },
		func() error { return s.Commit(ctx, "c", "c-active") },
		func() error { _, err := s.Prepare(ctx, "b", "c"); return err },
		func() error { writeFile(s, "b", "b"); return nil },
		func() error { _, err := s.View(ctx, "v", "c"); return err },
		func() error { _, err := s.Prepare(ctx, "d", ""); return err },
		func() error { _, err := s.Prepare(ctx, "e", ""); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	ids := map[string]uint32{}
	var base uint32
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		base = pi.BaseDeviceID
		if err != nil {
			return err
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			ids[sn.Key] = sn.DeviceID
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	// While the daemon runs, it holds the database: check says so.
	if _, err := OpenForCheck(ctx, cfg); err == nil || !errdefs.IsUnavailable(err) ||
		!strings.Contains(err.Error(), "the daemon is running (database in use): stop it first") {
		t.Errorf("check while the daemon runs: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The damage, with the daemon stopped.
	pool, _ := LoopPoolName(root)
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.Info(pool)
	if err != nil {
		t.Fatal(err)
	}
	poolDev := dmsetup.MajorMinor(info.Major, info.Minor)
	dev := func(id uint32) string { return dmsetup.DeviceName(pool, id) }
	activate := func(name string, id uint32) {
		t.Helper()
		tt, err := dmsetup.ThinTable(dmsetup.BytesToSectors(cfg.BaseSize), poolDev, id, "")
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Create(name, []dmsetup.Target{tt}, dmsetup.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	const orphan, activeOrphan = 900, 901
	must(c.CreateThin(pool, orphan))
	must(c.CreateThin(pool, activeOrphan))
	activate(dev(activeOrphan), activeOrphan)
	// Ghost: a's device and thin are gone.
	must(c.Remove(ctx, dev(ids["a"]), dmsetup.RemoveOptions{}))
	must(c.DeleteThin(pool, ids["a"]))
	// Stale: the base active again.
	activate(dev(base), base)
	// Wrong: b's name maps c's thin.
	must(c.Remove(ctx, dev(ids["b"]), dmsetup.RemoveOptions{}))
	activate(dev(ids["b"]), ids["c"])
	// Missing: the device of c, which v shares, is gone.
	must(c.Remove(ctx, dev(ids["c"]), dmsetup.RemoveOptions{}))
	// Cut short: e's device was made but got no table (a kill between
	// the two ioctls).
	must(c.Remove(ctx, dev(ids["e"]), dmsetup.RemoveOptions{}))
	if out, err := exec.Command("dmsetup", "create", dev(ids["e"]), "--notable").CombinedOutput(); err != nil {
		t.Fatalf("dmsetup create --notable: %v: %s", err, out)
	}

	db, err := storage.Open(ctx, filepath.Join(root, dbFile))
	if err != nil {
		t.Fatal(err)
	}
	var leaked uint32
	must(db.Update(ctx, func(tx *storage.Tx) error {
		// An interrupted remove of d, and an id allocated to nothing.
		d, err := tx.RemoveSnapshot("d")
		if err != nil {
			return err
		}
		if _, err := removalEntries(tx, d); err != nil {
			return err
		}
		leaked, err = tx.AllocateID()
		return err
	}))
	must(db.Close())

	want := []string{
		fmt.Sprintf("pending_journal d %d", ids["d"]),
		fmt.Sprintf("ghost a %d", ids["a"]),
		fmt.Sprintf("orphan  %d", orphan),
		fmt.Sprintf("orphan  %d", activeOrphan),
		fmt.Sprintf("leaked_id  %d", leaked),
	}
	// Devices in name order.
	devFindings := map[string]string{
		dev(ids["b"]):     fmt.Sprintf("wrong_device b %d", ids["b"]),
		dev(base):         fmt.Sprintf("stale_device  %d", base),
		dev(activeOrphan): fmt.Sprintf("stale_device  %d", activeOrphan),
		dev(ids["e"]):     fmt.Sprintf("missing_device e %d", ids["e"]),
	}
	for _, name := range sortedKeys(devFindings) {
		want = append(want, devFindings[name])
	}
	want = append(want, fmt.Sprintf("missing_device v %d", ids["c"]))

	ck, err := OpenForCheck(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	r, err := ck.Check(ctx, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := summary(r.Findings); !slices.Equal(got, want) {
		t.Fatalf("findings:\n got %q\nwant %q\n%+v", got, want, r.Findings)
	}
	// The metadata snapshot was released.
	must(c.ReserveMetadataSnap(pool))
	must(c.ReleaseMetadataSnap(pool))

	// thin_dump when thin_ls is missing; a clear error when both are.
	origPath := os.Getenv("PATH")
	toolDir := t.TempDir()
	dump, err := exec.LookPath("thin_dump")
	must(err)
	must(os.Symlink(dump, filepath.Join(toolDir, "thin_dump")))
	t.Setenv("PATH", toolDir)
	r2, err := ck.Check(ctx, CheckOptions{})
	if err != nil || !slices.Equal(summary(r2.Findings), want) {
		t.Errorf("with thin_dump only: %q, %v", summary(r2.Findings), err)
	}
	t.Setenv("PATH", t.TempDir())
	if _, err := ck.Check(ctx, CheckOptions{}); err == nil || !strings.Contains(err.Error(), "install thin-provisioning-tools") {
		t.Errorf("without the tools: %v", err)
	}
	t.Setenv("PATH", origPath)

	r, err = ck.Check(ctx, CheckOptions{Repair: true})
	if err != nil {
		t.Fatal(err)
	}
	// The orphans are kept as foreign: the database cannot prove it made
	// them.
	left := []string{fmt.Sprintf("ghost a %d", ids["a"]), fmt.Sprintf("foreign_id  %d", orphan), fmt.Sprintf("foreign_id  %d", activeOrphan)}
	if got := summary(r.Remaining); !slices.Equal(got, left) || r.Clean {
		t.Fatalf("after repair: %q, want %q\n%+v", got, left, r.Findings)
	}
	if inPool, err := c.MetadataThinIDs(ctx, pool); err != nil || !slices.Contains(inPool, orphan) || !slices.Contains(inPool, activeOrphan) {
		t.Fatalf("pool ids after repair %v, %v: an orphan was deleted", inPool, err)
	}
	r, err = ck.Check(ctx, CheckOptions{Repair: true, RemoveGhosts: true, ReleaseForeign: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean || len(r.Remaining) != 0 || !slices.Equal(summary(r.Findings), left) {
		t.Fatalf("after removing the ghost and releasing the foreign ids: %+v", r)
	}
	if !slices.Equal(r.PoolDevices, sorted(base, ids["c"], ids["b"], ids["e"])) {
		t.Errorf("pool devices %v", r.PoolDevices)
	}
	must(ck.Close())

	// The daemon serves the repaired state: b reads its own data again.
	s, err = New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for key, wantData := range map[string]string{"b": "b", "v": "c"} {
		m, err := s.Mounts(ctx, key)
		must(err)
		must(mount.All(m, mnt))
		got, err := os.ReadFile(filepath.Join(mnt, "f"))
		must(mount.UnmountAll(mnt, 0))
		if err != nil || string(got) != wantData {
			t.Errorf("%s reads %q, %v; want %q", key, got, err, wantData)
		}
	}
	// e's device got its table.
	m, err := s.Mounts(ctx, "e")
	must(err)
	must(mount.All(m, mnt))
	must(mount.UnmountAll(mnt, 0))
	if _, err := s.Stat(ctx, "a"); !errdefs.IsNotFound(err) {
		t.Errorf("ghost a still recorded: %v", err)
	}
	must(s.Close())
	ck, err = OpenForCheck(ctx, cfg)
	must(err)
	defer ck.Close()
	r, err = ck.Check(ctx, CheckOptions{})
	if err != nil || !r.Clean {
		t.Errorf("check after the daemon ran: %+v, %v", r, err)
	}
}

func sorted(ids ...uint32) []uint32 {
	slices.Sort(ids)
	return ids
}
