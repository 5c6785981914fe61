package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// TestIntegrationCheckCommand runs `thin-snapshotter check` on a real pool:
// refused while the daemon holds the database, then an orphan found,
// repaired, and a clean check.
func TestIntegrationCheckCommand(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := config.Default()
	cfg.Root = root
	sc := cfg.Snapshotter()
	sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
	s, err := snapshotter.New(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := snapshotter.LoopPoolName(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(root, "pool")); err != nil {
			t.Error(err)
		}
	})
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}

	cli := func(args ...string) (int, string, string) {
		t.Helper()
		old := defaultConfigPath
		defaultConfigPath = filepath.Join(t.TempDir(), "missing.toml")
		defer func() { defaultConfigPath = old }()
		var stdout, stderr strings.Builder
		code := run(append([]string{"thin-snapshotter", "--root", root, "check"}, args...), nil, &stdout, &stderr)
		return code, stdout.String(), stderr.String()
	}

	code, out, errOut := cli()
	if code != checkError || !strings.Contains(errOut, "the daemon is running (database in use): stop it first") {
		t.Errorf("check with the daemon running: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const orphan = 500
	if err := c.CreateThin(pool, orphan); err != nil {
		t.Fatal(err)
	}

	code, out, errOut = cli("--json")
	var r snapshotter.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("exit %d, %v: %s %s", code, err, out, errOut)
	}
	if code != checkProblems || r.Clean || len(r.Findings) != 1 || r.Findings[0].Kind != snapshotter.FindingOrphan ||
		r.Findings[0].DeviceID != orphan || r.Pool != pool || r.Records != 1 {
		t.Errorf("check: exit %d, report %+v, stderr %q", code, r, errOut)
	}

	// The database cannot prove it made the orphan: a repair keeps it as
	// foreign, and only --release-foreign deletes it.
	code, out, errOut = cli("--repair")
	if code != checkProblems || !strings.Contains(out, fmt.Sprintf("repaired: recorded thin device %d as foreign", orphan)) ||
		!strings.Contains(out, "needs a person: 1 problem left") || !strings.Contains(out, "foreign_id") {
		t.Errorf("repair: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if ids, err := c.MetadataThinIDs(ctx, pool); err != nil || !slices.Contains(ids, orphan) {
		t.Errorf("pool ids after repair %v (%v): the orphan was deleted", ids, err)
	}
	code, out, errOut = cli("--repair", "--release-foreign")
	if code != checkClean || !strings.Contains(out, fmt.Sprintf("deleted foreign thin device %d", orphan)) || !strings.Contains(out, "clean now") {
		t.Errorf("repair --release-foreign: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, errOut = cli()
	if code != checkClean || !strings.HasSuffix(out, "clean\n") || errOut != "" {
		t.Errorf("check after repair: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}
