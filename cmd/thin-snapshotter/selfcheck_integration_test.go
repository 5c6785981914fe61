package main

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// TestIntegrationSelfCheckAfterRecovery: a daemon whose start had to
// finish an interrupted removal checks itself at once, with the default
// check_interval: it releases an id leaked on purpose, and status and the
// metrics show that and the ghost it leaves for a person.
func TestIntegrationSelfCheckAfterRecovery(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	metricsAddr := freeAddr(t)
	cfg := testConfig(t)
	cfg.MetricsAddress = metricsAddr
	sc := cfg.Snapshotter()
	sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
	pool, err := snapshotter.LoopPoolName(cfg.Root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(cfg.Root, "pool")); err != nil {
			t.Error(err)
		}
	})
	sn, err := snapshotter.New(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []func() error{
		func() error { _, err := sn.Prepare(ctx, "a", ""); return err },
		func() error { _, err := sn.Prepare(ctx, "c-active", ""); return err },
		func() error { return sn.Commit(ctx, "c", "c-active") },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	devs, err := sn.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]uint32{}
	for _, d := range devs {
		ids[d.Key] = d.ID
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}

	// Stopped: a crash in the middle of removing a, an id allocated to
	// nothing, and c's thin device deleted behind the daemon's back.
	db, err := storage.Open(ctx, filepath.Join(cfg.Root, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	var leaked uint32
	err = db.Update(ctx, func(tx *storage.Tx) error {
		a, err := tx.RemoveSnapshot("a")
		if err != nil {
			return err
		}
		// As Remove does: the id reserved for a's commit goes at once.
		if err := tx.ReleaseID(a.CommitID); err != nil {
			return err
		}
		if _, err := tx.AddJournal(storage.Entry{Op: storage.OpDelete, DeviceID: ids["a"], Key: "a"}); err != nil {
			return err
		}
		leaked, err = tx.AllocateID()
		return err
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.DeleteThin(pool, ids["c"]); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	sn, err = snapshotter.New(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	d := startServe(t, cfg, sn, nil, 5*time.Second)
	d.waitReady(t)
	var out string
	for {
		var code int
		code, out, _ = runCLI(t, "status", "--address="+cfg.Address)
		if code == 0 && strings.Contains(out, "self-check      every 1h; last after recovery") {
			break
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("no self-check after the recovery:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("thin-snapshotter status:\n%s", out)
	for _, want := range []string{
		"last start      recovery took ",
		"1 removals finished",
		": 2 problems, 1 repaired online, 1 left\n",
		fmt.Sprintf("repaired leaked_id: released id %d\n", leaked),
		fmt.Sprintf(" snapshot \"c\": thin device %d is not in the pool (its data is lost)\n", ids["c"]),
		"left ghost: ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	body := scrape(t, metricsAddr)
	for _, re := range []string{
		`(?m)^thin_snapshotter_check_interval_seconds 3600$`,
		`(?m)^thin_snapshotter_check_findings\{kind="ghost"\} 1$`,
		`(?m)^thin_snapshotter_check_findings\{kind="leaked_id"\} 0$`,
		`(?m)^thin_snapshotter_check_repaired\{kind="leaked_id"\} 1$`,
		`(?m)^thin_snapshotter_check_last_run_success 1$`,
		`(?m)^thin_snapshotter_check_last_run_duration_seconds [0-9.e+-]+$`,
		`(?m)^thin_snapshotter_check_last_run_timestamp_seconds 1\.[0-9]+e\+09$`,
	} {
		if !regexp.MustCompile(re).MatchString(body) {
			t.Errorf("metrics do not match %s:\n%s", re, grepLines(body, "thin_snapshotter_check"))
		}
	}
	if err := d.stop(t); err != nil {
		t.Fatal(err)
	}
}
