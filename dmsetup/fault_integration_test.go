//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// TestIntegrationMessageCommitFails: when the metadata commit that follows a
// pool message fails, the kernel still answers the message with success,
// rolls the change back and turns the pool read-only with needs_check. The
// client reports EIO instead, and the pool refuses the next message.
func TestIntegrationMessageCommitFails(t *testing.T) {
	c := requireDM(t)
	if _, err := c.TargetVersion("flakey"); err != nil {
		if os.Getenv(requireDMEnv) == "1" {
			t.Fatalf("dm target flakey required (%s=1; THIN_VM_MODULES=dm-flakey): %v", requireDMEnv, err)
		}
		t.Skipf("no dm target flakey: %v", err)
	}
	dir := t.TempDir()
	attach := func(name string, size int64) *loopDev {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
		l, err := attachLoop(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(l.close) // autoclear: the loop goes with its last user
		return l
	}
	metaLoop, dataLoop := attach("metadata", testMetaSize), attach("data", testDataSize)
	metaSectors := BytesToSectors(testMetaSize)
	linear := Target{Length: metaSectors, Type: "linear", Params: metaLoop.devArg() + " 0"}
	meta := devName("meta")
	if err := c.Create(meta, []Target{linear}, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, meta) })
	info, err := c.Info(meta)
	if err != nil {
		t.Fatal(err)
	}
	pool := devName("pool")
	table, err := poolTable(BytesToSectors(testDataSize), PoolParams{
		MetadataDev: MajorMinor(info.Major, info.Minor), DataDev: dataLoop.devArg(), BlockSizeSectors: 128,
	})
	if err != nil {
		t.Fatal(err)
	}
	create := func() {
		t.Helper()
		if err := c.Create(pool, []Target{table}, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create()
	t.Cleanup(func() { removeIfExists(t, c, pool) })
	if err := c.CreateThin(pool, 1); err != nil {
		t.Fatal(err)
	}

	// Every write to the metadata fails from now on; reads still work.
	flakey := Target{Length: metaSectors, Type: "flakey", Params: metaLoop.devArg() + " 0 0 1 1 error_writes"}
	if err := c.Reload(meta, []Target{flakey}); err != nil {
		t.Fatal(err)
	}
	err = c.CreateThin(pool, 2)
	st, serr := c.PoolStatusNoCommit(pool)
	t.Logf("create_thin with the commit failing: %v; pool %s", err, st)
	if !errors.Is(err, unix.EIO) || serr != nil || !st.ReadOnly() || !st.NeedsCheck {
		t.Fatalf("create_thin with the commit failing: %v; pool %+v (%v), want EIO and a read-only pool needing a check", err, st, serr)
	}
	if err := c.CreateThin(pool, 3); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("create_thin on the read-only pool: %v, want EOPNOTSUPP", err)
	}

	// The metadata device works again. Checked (which clears the
	// needs_check flag the pool may have written) and set up afresh, the
	// pool is writable and has what was committed.
	if err := c.Reload(meta, []Target{linear}); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(context.Background(), pool, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	run(t, "thin_check", "--clear-needs-check-flag", c.DevicePath(meta))
	create()
	if st, err := c.PoolStatusNoCommit(pool); err != nil || st.ReadOnly() {
		t.Errorf("pool after thin_check: %s, %v; want it writable", st, err)
	}
	ids, err := c.MetadataThinIDs(context.Background(), pool)
	if err != nil || !slices.Equal(ids, []uint32{1}) {
		t.Errorf("thin ids after the rollback: %v, %v; want [1]", ids, err)
	}
}
