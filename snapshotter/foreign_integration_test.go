package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationForeignIDs: thin devices created in the pool behind our
// back, at the ids we would pick next, are skipped by Prepare, reported by
// check and deleted only by --release-foreign.
func TestIntegrationForeignIDs(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	s := newEmbedded(t, cfg)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	a, err := s.ready(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	pool := s.pool.Name()
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Someone else takes the next two ids while the daemon runs (a's
	// commit has the one after a's own).
	foreign := []uint32{a.CommitID + 1, a.CommitID + 2}
	for _, id := range foreign {
		if err := c.CreateThin(pool, id); err != nil {
			t.Fatal(err)
		}
	}
	m, err := s.Prepare(ctx, "b", "")
	if err != nil {
		t.Fatalf("prepare with the next ids taken: %v", err)
	}
	b, err := s.ready(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	if want := a.CommitID + 3; b.DeviceID != want {
		t.Errorf("b has id %d, want %d", b.DeviceID, want)
	}
	mnt := t.TempDir()
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	err = os.WriteFile(filepath.Join(mnt, "f"), []byte("b"), 0o644)
	if uerr := mount.UnmountAll(mnt, 0); err == nil {
		err = uerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	ck, err := OpenForCheck(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	inPool := func() []uint32 {
		t.Helper()
		ids, err := c.MetadataThinIDs(ctx, pool)
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}
	want := []string{"foreign_id  " + strconv.FormatUint(uint64(foreign[0]), 10), "foreign_id  " + strconv.FormatUint(uint64(foreign[1]), 10)}
	for _, opts := range []CheckOptions{{}, {Repair: true}} {
		r, err := ck.Check(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		if got := summary(r.Remaining); !slices.Equal(got, want) {
			t.Errorf("%+v: remaining %v, want %v", opts, got, want)
		}
	}
	for _, id := range foreign {
		if !slices.Contains(inPool(), id) {
			t.Errorf("foreign device %d deleted without --release-foreign", id)
		}
	}
	r, err := ck.Check(ctx, CheckOptions{Repair: true, ReleaseForeign: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean {
		t.Errorf("not clean after --release-foreign: %+v", r.Remaining)
	}
	for _, id := range foreign {
		if slices.Contains(inPool(), id) {
			t.Errorf("foreign device %d still in the pool after --release-foreign", id)
		}
	}
	t.Logf("findings: %+v", r.Findings)
}
