package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// TestIntegrationAdmin runs the admin commands against a daemon serving a
// real pool: status, devices, a removal stuck on a busy device finished by
// cleanup, check --online finding an orphan made behind the daemon's back,
// and the pool metrics.
func TestIntegrationAdmin(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	metricsAddr := freeAddr(t)

	cfg := testConfig(t)
	cfg.MetricsAddress = metricsAddr
	sc := cfg.Snapshotter()
	sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
	sn, err := snapshotter.New(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := snapshotter.LoopPoolName(cfg.Root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(cfg.Root, "pool")); err != nil {
			t.Error(err)
		}
	})
	d := startServe(t, cfg, sn, nil, 5*time.Second)
	d.waitReady(t)
	addr := "--address=" + cfg.Address
	cli := func(args ...string) (int, string, string) {
		t.Helper()
		return runCLI(t, append(args, addr)...)
	}

	code, out, errOut := cli("status")
	if code != 0 || !strings.Contains(out, "pool            "+pool+"\n") || !strings.Contains(out, "mode            rw\n") ||
		!strings.Contains(out, "snapshots       0 active, 0 view, 0 committed; 0 not ready") {
		t.Fatalf("status of a new pool: exit %d:\n%s%s", code, out, errOut)
	}

	client := dialSnapshotter(t, cfg.Address)
	if _, err := client.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := client.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	// The view first: c still has its warm device then, so the view
	// makes none ahead for b (the counts below would race it).
	if _, err := client.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Prepare(ctx, "b", "c"); err != nil {
		t.Fatal(err)
	}
	// Prepare tmp from the base, not from c: a second child of c would
	// make the worker prepare another warm device of c in the background,
	// and the counts below would race it.
	if _, err := client.Prepare(ctx, "tmp", ""); err != nil {
		t.Fatal(err)
	}
	if err := client.Commit(ctx, "c2", "tmp"); err != nil {
		t.Fatal(err)
	}

	code, out, errOut = cli("status")
	t.Logf("thin-snapshotter status:\n%s", out)
	if code != 0 || !strings.Contains(out, "snapshots       1 active, 1 view, 2 committed; 0 not ready") ||
		!strings.Contains(out, "dm devices      3 active, 1 of them warm") || !strings.Contains(out, "journal         0 pending entries, 0 pending removals") {
		t.Errorf("status: exit %d:\n%s%s", code, out, errOut)
	}
	code, out, _ = cli("status", "--json")
	var st struct {
		Data struct {
			Used  string `json:"used_bytes"`
			Total string `json:"total_bytes"`
			Block string `json:"block_size_bytes"`
		} `json:"data"`
		PoolTx string `json:"pool_transaction_id"`
		DBTx   string `json:"db_transaction_id"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || code != 0 {
		t.Fatalf("status --json: exit %d, %v:\n%s", code, err, out)
	}
	if st.Data.Total != strconv.Itoa(1<<30) || st.Data.Used == "0" || st.Data.Block != strconv.Itoa(int(sc.BlockSize)) || st.PoolTx != st.DBTx {
		t.Errorf("status --json: %+v", st)
	}

	code, out, errOut = cli("devices")
	t.Logf("thin-snapshotter devices:\n%s", out)
	ids := map[string]uint32{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		f := strings.Fields(line)
		id, _ := strconv.ParseUint(f[0], 10, 32)
		ids[f[len(f)-1]] = uint32(id)
		if want := fmt.Sprintf("%s-snap-%d", pool, id); f[len(f)-2] != want {
			t.Errorf("device line %q: name is not %s", line, want)
		}
	}
	// v shares c's device, active read-only; it has none of its own.
	if code != 0 || len(ids) != 4 || !regexp.MustCompile(`(?m)^\d+ +active +ready +yes +0 +\S+ \S+ +64\.0 MiB .* b$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^\d+ +committed +ready +ro +0 .* c$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^\d+ +base +ready +no +- +- +64\.0 MiB`).MatchString(out) {
		t.Errorf("devices: exit %d, ids %v:\n%s%s", code, ids, out, errOut)
	}

	// b took c's warm device, which is a's device kept by the commit.
	// tmp's device, kept the same way by its commit, still waits for a
	// child of c2 (it is the third active dm device); cleanup deletes it.
	if code, out, errOut := cli("cleanup"); code != 0 {
		t.Fatalf("cleanup: exit %d, %q, %q", code, out, errOut)
	}

	// A removal whose device is busy stays pending: activate c2's device
	// behind the daemon's back and hold it open.
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.Info(pool)
	if err != nil {
		t.Fatal(err)
	}
	name := dmsetup.DeviceName(pool, ids["c2"])
	tt, err := dmsetup.ThinTable(dmsetup.BytesToSectors(64<<20), fmt.Sprintf("%d:%d", info.Major, info.Minor), ids["c2"], "")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Create(name, []dmsetup.Target{tt}, dmsetup.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(c.DevicePath(name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := client.Remove(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	code, out, _ = cli("status")
	if code != 0 || !strings.Contains(out, "journal         1 pending entries, 1 pending removals") {
		t.Errorf("status with a busy removal: exit %d:\n%s", code, out)
	}
	code, out, _ = cli("devices")
	if code != 0 || !regexp.MustCompile(fmt.Sprintf(`(?m)^%d +- +removing +yes +1 `, ids["c2"])).MatchString(out) {
		t.Errorf("devices with a busy removal: exit %d:\n%s", code, out)
	}
	code, out, _ = cli("check", "--online")
	if code != checkProblems || !strings.Contains(out, fmt.Sprintf("pending_journal  interrupted delete of thin device %d", ids["c2"])) {
		t.Errorf("check --online with a busy removal: exit %d:\n%s", code, out)
	}
	code, out, errOut = cli("cleanup")
	if code != 1 || out != "pending removals: 1 before, 1 after\n" || !strings.Contains(errOut, "1 removals left pending") {
		t.Errorf("cleanup while busy: exit %d, %q, %q", code, out, errOut)
	}
	// The failed deactivation is counted, whether the worker or cleanup
	// tried it (cleanup leaves a removal the worker is busy with alone).
	busyErr := regexp.MustCompile(`(?m)^thin_snapshotter_kernel_step_errors_total\{step="deactivate"\} [1-9]`)
	for i := 0; !busyErr.MatchString(scrape(t, metricsAddr)); i++ {
		if i == 30 {
			t.Fatalf("no failed deactivate counted while %s was held open", name)
		}
		cli("cleanup")
		time.Sleep(time.Second)
	}
	f.Close()
	// The background worker may be retrying the same removal: then cleanup
	// leaves it to the worker and says so; a later one sees it done.
	for range 10 {
		code, out, errOut = cli("cleanup")
		if code == 0 || !strings.Contains(errOut, "being removed in the background") {
			break
		}
		time.Sleep(time.Second)
	}
	if code != 0 || !strings.HasSuffix(out, " 0 after\n") {
		t.Errorf("cleanup: exit %d, %q, %q", code, out, errOut)
	}
	if _, err := c.Info(name); !dmsetup.IsNotFound(err) {
		t.Errorf("device %s after cleanup: %v", name, err)
	}

	code, out, errOut = cli("check", "--online")
	if code != checkClean || !strings.HasSuffix(out, "clean\n") {
		t.Errorf("check --online: exit %d:\n%s%s", code, out, errOut)
	}
	// An orphan made while the daemon serves: found, read-only.
	const orphan = 500
	if err := c.CreateThin(pool, orphan); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = cli("check", "--online", "--json")
	var r snapshotter.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("check --online --json: exit %d, %v:\n%s%s", code, err, out, errOut)
	}
	if code != checkProblems || !r.Online || len(r.Findings) != 1 || r.Findings[0].Kind != snapshotter.FindingOrphan || r.Findings[0].DeviceID != orphan {
		t.Errorf("check --online with an orphan: exit %d: %+v", code, r)
	}
	if err := c.DeleteThin(pool, orphan); err != nil {
		t.Fatal(err)
	}
	// The daemon kept serving meanwhile.
	if _, err := client.Prepare(ctx, "after", ""); err != nil {
		t.Fatal(err)
	}

	body := scrape(t, metricsAddr)
	for _, re := range []string{
		`(?m)^thin_snapshotter_pool_status_up 1$`,
		`(?m)^thin_snapshotter_pool_mode\{mode="rw"\} 1$`,
		`(?m)^thin_snapshotter_pool_data_size_bytes 1\.073741824e\+09$`,
		`(?m)^thin_snapshotter_pool_data_used_bytes [1-9]`,
		`(?m)^thin_snapshotter_snapshots\{kind="active"\} 2$`,
		`(?m)^thin_snapshotter_pending_removals 0$`,
		// One create_snap each for a, c, tmp, c2 and after; none for v,
		// which shares c's device, nor for b,
		// which took a's device, kept warm by the commit. The base was
		// made before serve set the observer, so it is not counted.
		`(?m)^thin_snapshotter_kernel_step_duration_seconds_count\{step="create_snap"\} 5$`,
		// One delete for tmp's warm device, one for c2's device.
		`(?m)^thin_snapshotter_kernel_step_duration_seconds_count\{step="delete"\} 2$`,
	} {
		if !regexp.MustCompile(re).MatchString(body) {
			t.Errorf("metrics do not match %s:\n%s", re, grepLines(body, "thin_snapshotter_"))
		}
	}
	if err := d.stop(t); err != nil {
		t.Fatal(err)
	}
}
