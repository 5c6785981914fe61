package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/proto"

	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
	adminv1 "github.com/thin-snapshotter/thin-snapshotter/proto/thin/admin/v1"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// adminSnapshotter is a testSnapshotter with the admin methods, returning
// what the test sets.
type adminSnapshotter struct {
	*testSnapshotter

	mu        sync.Mutex
	status    snapshotter.Status
	statusErr error
	devices   []snapshotter.Device
	report    *snapshotter.Report
	cleanups  int
	observer  snapshotter.StepObserver
}

// SharedLayers and Growths are the counters the snapshotter keeps itself
// (snapshotterCounters), with fixed values the tests look for.
func (a *adminSnapshotter) SharedLayers() uint64 { return 7 }
func (a *adminSnapshotter) Growths() uint64      { return 2 }

func (a *adminSnapshotter) Status(context.Context) (snapshotter.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status, a.statusErr
}

func (a *adminSnapshotter) Devices(context.Context) ([]snapshotter.Device, error) {
	return a.devices, nil
}

func (a *adminSnapshotter) CheckOnline(context.Context) (*snapshotter.Report, error) {
	if a.report == nil {
		return nil, errors.New("check failed: " + errdefs.ErrNotImplemented.Error())
	}
	return a.report, nil
}

func (a *adminSnapshotter) Drain(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.cleanups++
	if a.status.PendingRemovals > 1 {
		a.status.PendingRemovals = 1
		return errors.New("device 7 of removed \"k\": device busy")
	}
	a.status.PendingRemovals = 0
	return nil
}

func (a *adminSnapshotter) SetStepObserver(o snapshotter.StepObserver) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.observer = o
}

func testStatus() snapshotter.Status {
	return snapshotter.Status{
		Pool: "thin-abc-pool", Mode: snapshotter.ModeRW, WhenFull: snapshotter.WhenFullError,
		PoolTransactionID: 12, DBTransactionID: 12,
		DataBlockSize: 64 << 10, DataUsed: 3 << 30, DataTotal: 100 << 30, DataLowWaterMark: 1 << 30,
		MetadataUsed: 12 << 20, MetadataTotal: 1 << 30, MetadataLowWater: true,
		Snapshots:     map[string]int{snapshotter.KindActive: 2, snapshotter.KindCommitted: 5},
		ActiveDevices: 2, WarmDevices: 1, PendingJournal: 3, PendingRemovals: 2,
		LastRecovery: snapshotter.Recovery{RolledBackCreates: 1, ReactivatedDevices: 4, Duration: 1500 * time.Microsecond},
		MinFreeData:  5, MinFreeMetadata: 10,
		CheckInterval: time.Hour,
		LastCheck: snapshotter.CheckRun{
			Trigger: snapshotter.CheckAfterRecovery, Ended: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Duration: 1234 * time.Millisecond,
			Findings: []snapshotter.Finding{
				{Kind: snapshotter.FindingLeakedID, DeviceID: 8, Message: "id 8 is allocated but in no record", Repairable: true,
					Action: "released id 8", Repaired: true},
				{Kind: snapshotter.FindingGhost, DeviceID: 3, Key: "k", Message: `active snapshot "k": thin device 3 is not in the pool`},
				{Kind: snapshotter.FindingPendingJournal, DeviceID: 4, Message: "interrupted delete of thin device 4", Repairable: true,
					Action: "finished the removal of thin device 4", Error: "device busy"},
			},
		},
		ImageFS: snapshotter.ImageFSStatus{Dir: "/var/lib/thin-snapshotter/imagefs", Mirrored: true, Device: "/dev/loop3",
			Stat: imagefs.Stat{Major: 7, Minor: 3, Capacity: 100 << 30, Available: 92 << 30, Inodes: 1024, InodesFree: 1013}},
	}
}

func newAdminSnapshotter(t *testing.T) *adminSnapshotter {
	return &adminSnapshotter{
		testSnapshotter: newTestSnapshotter(t),
		status:          testStatus(),
		devices: []snapshotter.Device{
			{ID: 1, Name: "thin-abc-pool-snap-1", Kind: snapshotter.KindBase, State: "ready", VirtualSize: 10 << 30},
			{ID: 2, Name: "thin-abc-pool-snap-2", Key: "default/3/sha256:aa", Kind: snapshotter.KindActive, State: "ready",
				Active: true, OpenCount: 1, MappedBytes: 5 << 20, VirtualSize: 10 << 30},
		},
	}
}

// runCLI runs the command line against the daemon at address.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	old := defaultConfigPath
	defaultConfigPath = filepath.Join(t.TempDir(), "missing.toml")
	defer func() { defaultConfigPath = old }()
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"thin-snapshotter"}, args...), nil, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestAdminCommands(t *testing.T) {
	cfg := testConfig(t)
	sn := newAdminSnapshotter(t)
	d := startServe(t, cfg, sn, nil, time.Second)
	d.waitReady(t)
	addr := "--address=" + cfg.Address

	code, out, errOut := runCLI(t, "status", addr)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"pool            thin-abc-pool",
		"mode            rw",
		"when full       writes fail at once",
		"data            3.0 GiB of 100.0 GiB used (3.0%), 97.0 GiB free; low-water mark 1.0 GiB\n",
		"metadata        12.0 MiB of 1.0 GiB used (1.2%), 1012.0 MiB free; LOW-WATER MARK CROSSED\n",
		"transaction id  pool 12, database 12",
		"snapshots       2 active, 0 view, 5 committed; 0 not ready",
		"journal         3 pending entries, 2 pending removals",
		"dm devices      2 active, 1 of them warm",
		"recovery took 1.5ms: 1 creates rolled back, 0 removals finished, 0 deferred (busy), 0 commits dropped, 0 commits finished, 4 devices reactivated",
		"new devices refused below 5% free data, 10% free metadata; async_remove false",
		"self-check      every 1h; last after recovery, ended 2026-01-02T03:04:05Z, took 1.234s: 3 problems, 1 repaired online, 2 left\n" +
			"                repaired leaked_id: released id 8\n" +
			"                left ghost: active snapshot \"k\": thin device 3 is not in the pool\n" +
			"                left pending_journal: interrupted delete of thin device 4 (finished the removal of thin device 4 failed: device busy)\n",
		"imagefs         the kubelet sees 100.0 GiB, 92.0 GiB available, at /var/lib/thin-snapshotter/imagefs (device 7:3, the pool's mirror on /dev/loop3)\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}

	code, out, errOut = runCLI(t, "status", "--json", addr)
	if code != 0 {
		t.Fatalf("status --json: exit %d: %s", code, errOut)
	}
	var js map[string]any
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if js["pool"] != "thin-abc-pool" || js["pending_removals"] != float64(2) ||
		js["data"].(map[string]any)["used_bytes"] != "3221225472" || js["snapshots"].(map[string]any)["view"] != float64(0) ||
		js["image_fs"].(map[string]any)["available_bytes"] != "98784247808" || js["image_fs"].(map[string]any)["mirrored"] != true {
		t.Errorf("status --json:\n%s", out)
	}
	sc := js["self_check"].(map[string]any)
	if sc["interval"] != "3600s" || sc["ended"] != "2026-01-02T03:04:05Z" || sc["trigger"] != "recovery" ||
		len(sc["findings"].([]any)) != 3 || sc["findings"].([]any)[0].(map[string]any)["repaired"] != true {
		t.Errorf("status --json self_check: %v", sc)
	}

	code, out, errOut = runCLI(t, "devices", addr)
	if code != 0 {
		t.Fatalf("devices: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "ID  KIND") ||
		strings.Join(strings.Fields(lines[2]), " ") != "2 active ready yes 1 5.0 MiB 10.0 GiB thin-abc-pool-snap-2 default/3/sha256:aa" ||
		strings.Join(strings.Fields(lines[1]), " ") != "1 base ready no - - 10.0 GiB thin-abc-pool-snap-1 -" {
		t.Errorf("devices output:\n%s", out)
	}

	// Cleanup: one removal finishes, one stays busy.
	code, out, errOut = runCLI(t, "cleanup", addr)
	if code != 1 || out != "pending removals: 2 before, 1 after\n" || !strings.Contains(errOut, "1 removals left pending: device 7") {
		t.Errorf("cleanup: exit %d, out %q, err %q", code, out, errOut)
	}
	if code, out, _ = runCLI(t, "cleanup", addr); code != 0 || out != "pending removals: 1 before, 0 after\n" {
		t.Errorf("second cleanup: exit %d, out %q", code, out)
	}

	// check --online: the report as the offline check prints it.
	code, _, errOut = runCLI(t, "check", "--online", addr)
	if code != checkError || !strings.Contains(errOut, "check failed") {
		t.Errorf("check --online failing: exit %d, %q", code, errOut)
	}
	sn.report = &snapshotter.Report{Pool: "thin-abc-pool", Records: 7, PoolDevices: []uint32{1, 2},
		Findings: []snapshotter.Finding{{Kind: snapshotter.FindingOrphan, DeviceID: 9, Message: "thin device 9 is in the pool", Repairable: true}}}
	code, out, _ = runCLI(t, "check", "--online", addr)
	if code != checkProblems || !strings.Contains(out, "orphan           thin device 9 is in the pool\n") ||
		!strings.Contains(out, "1 problem found; --repair fixes them") {
		t.Errorf("check --online: exit %d:\n%s", code, out)
	}
	code, out, _ = runCLI(t, "check", "--online", "--json", addr)
	var r snapshotter.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil || code != checkProblems || !r.Online || r.Clean ||
		len(r.Remaining) != 1 || r.Remaining[0].DeviceID != 9 || r.Records != 7 {
		t.Errorf("check --online --json: exit %d, %v:\n%s", code, err, out)
	}
	sn.report = &snapshotter.Report{Pool: "thin-abc-pool", Clean: true}
	if code, out, _ = runCLI(t, "check", "--online", addr); code != checkClean || !strings.HasSuffix(out, "clean\n") {
		t.Errorf("clean check --online: exit %d:\n%s", code, out)
	}
	if code, _, errOut = runCLI(t, "check", "--online", "--repair", addr); code != checkError || !strings.Contains(errOut, "--repair needs the daemon stopped") {
		t.Errorf("check --online --repair: exit %d: %s", code, errOut)
	}

	// A failing Status keeps its kind through the socket.
	sn.mu.Lock()
	sn.statusErr = errdefs.ErrUnavailable
	sn.mu.Unlock()
	if code, _, errOut = runCLI(t, "status", addr); code != 1 || !strings.Contains(errOut, "unavailable") {
		t.Errorf("failing status: exit %d: %s", code, errOut)
	}
}

func TestAdminNoDaemon(t *testing.T) {
	dir := shortTempDir(t)
	missing := filepath.Join(dir, "missing.sock")
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	// Closing a unix listener removes its file; keep the file, stop
	// listening.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	for _, c := range []struct{ address, why string }{{missing, "no socket"}, {stale, "connection refused"}} {
		for _, args := range [][]string{{"status"}, {"devices"}, {"cleanup"}, {"check", "--online"}} {
			code, out, errOut := runCLI(t, append(args, "--address", c.address)...)
			want := "thin-snapshotter: no thin-snapshotter daemon at " + c.address + " (" + c.why
			if code == 0 || out != "" || !strings.HasPrefix(errOut, want) || strings.Count(errOut, "\n") != 1 {
				t.Errorf("%v at %s: exit %d, out %q, err %q; want one line starting %q", args, c.address, code, out, errOut, want)
			}
		}
	}
}

// A snapshotter without the admin methods is served without the admin API:
// the client says so.
func TestAdminNotServed(t *testing.T) {
	cfg := testConfig(t)
	d := startServe(t, cfg, newTestSnapshotter(t), nil, time.Second)
	d.waitReady(t)
	code, _, errOut := runCLI(t, "status", "--address", cfg.Address)
	if code != 1 || !strings.Contains(errOut, "does not serve the admin API") {
		t.Errorf("status: exit %d: %s", code, errOut)
	}
}

func TestVersionFlag(t *testing.T) {
	oldV, oldC := version, commit
	defer func() { version, commit = oldV, oldC }()
	version, commit = "v1.2.3", "0123abcd"
	code, out, _ := runCLI(t, "--version")
	if code != 0 || out != "thin-snapshotter version v1.2.3 (commit 0123abcd)\n" {
		t.Errorf("--version: exit %d, %q", code, out)
	}
	// Built without -ldflags, the version comes from the build info, or
	// is the fallback.
	version, commit = "", ""
	v, c := buildVersion()
	if v == "" || c == "" {
		t.Errorf("buildVersion() = %q, %q", v, c)
	}
}

func TestPoolMetrics(t *testing.T) {
	addr := freeAddr(t)
	cfg := testConfig(t)
	cfg.MetricsAddress = addr
	sn := newAdminSnapshotter(t)
	d := startServe(t, cfg, sn, nil, time.Second)
	d.waitReady(t)

	sn.mu.Lock()
	obs := sn.observer
	sn.mu.Unlock()
	if obs == nil {
		t.Fatal("no step observer set")
	}
	obs.ObserveStep(snapshotter.StepCreateSnap, 3*time.Millisecond, nil)
	obs.ObserveStep(snapshotter.StepMkfs, time.Second, errors.New("mkfs failed"))

	body := scrape(t, addr)
	for _, want := range []string{
		`thin_snapshotter_pool_status_up 1`,
		`thin_snapshotter_pool_mode{mode="rw"} 1`,
		`thin_snapshotter_pool_mode{mode="needs_check"} 0`,
		`thin_snapshotter_pool_needs_check 0`,
		`thin_snapshotter_pool_data_low_water_mark_crossed 0`,
		`thin_snapshotter_pool_metadata_low_water_mark_crossed 1`,
		`thin_snapshotter_pool_data_used_bytes 3.221225472e+09`,
		`thin_snapshotter_pool_metadata_size_bytes 1.073741824e+09`,
		`thin_snapshotter_pool_data_min_free_ratio 0.05`,
		`thin_snapshotter_snapshots{kind="committed"} 5`,
		`thin_snapshotter_snapshots{kind="view"} 0`,
		`thin_snapshotter_dm_devices 2`,
		`thin_snapshotter_journal_pending_entries 3`,
		`thin_snapshotter_pending_removals 2`,
		`thin_snapshotter_warm_devices 1`,
		`thin_snapshotter_recovery_actions{action="reactivated_device"} 4`,
		`thin_snapshotter_recovery_duration_seconds 0.0015`,
		`thin_snapshotter_kernel_step_duration_seconds_count{step="create_snap"} 1`,
		`thin_snapshotter_kernel_step_duration_seconds_count{step="delete"} 0`,
		`thin_snapshotter_kernel_step_errors_total{step="mkfs"} 1`,
		`thin_snapshotter_kernel_step_errors_total{step="create_snap"} 0`,
		`thin_snapshotter_build_info{`,
		`thin_snapshotter_shared_layers_total 7`,
		`thin_snapshotter_pool_growths_total 2`,
		`thin_snapshotter_check_interval_seconds 3600`,
		`thin_snapshotter_check_findings{kind="ghost"} 1`,
		`thin_snapshotter_check_findings{kind="pending_journal"} 1`,
		`thin_snapshotter_check_findings{kind="leaked_id"} 0`,
		`thin_snapshotter_check_findings{kind="orphan"} 0`,
		`thin_snapshotter_check_repaired{kind="leaked_id"} 1`,
		`thin_snapshotter_check_repaired{kind="ghost"} 0`,
		`thin_snapshotter_check_last_run_timestamp_seconds 1.767323045e+09`,
		`thin_snapshotter_check_last_run_duration_seconds 1.234`,
		`thin_snapshotter_check_last_run_success 1`,
	} {
		if !strings.Contains(body, want+"\n") && !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// A failing status: the scrape still works, pool_status_up says so.
	sn.mu.Lock()
	sn.statusErr = errors.New("ioctl failed")
	sn.mu.Unlock()
	body = scrape(t, addr)
	if !strings.Contains(body, "thin_snapshotter_pool_status_up 0\n") || strings.Contains(body, "thin_snapshotter_pool_data_used_bytes") {
		t.Errorf("metrics with a failing status:\n%s", grepLines(body, "thin_snapshotter_pool"))
	}
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s\n%s", resp.Status, b)
	}
	return string(b)
}

func grepLines(s, substr string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// The status line says what the kubelet sees, and whether it is the pool.
func TestStatusImageFSLine(t *testing.T) {
	base := adminv1.ImageFS{Dir: "/r/imagefs", Major: 7, Minor: 3, CapacityBytes: 2 << 30, AvailableBytes: 1 << 30}
	for _, tc := range []struct {
		name string
		mod  func(f *adminv1.ImageFS)
		want string
	}{
		{"mirrored", func(f *adminv1.ImageFS) { f.Mirrored, f.Device = true, "/dev/loop3" },
			"the kubelet sees 2.0 GiB, 1.0 GiB available, at /r/imagefs (device 7:3, the pool's mirror on /dev/loop3)"},
		{"last update failed", func(f *adminv1.ImageFS) { f.Mirrored, f.Device, f.Error = true, "/dev/loop3", "resize2fs: exit 1" },
			"the kubelet sees 2.0 GiB, 1.0 GiB available, at /r/imagefs (device 7:3, the pool's mirror on /dev/loop3); MIRROR FAILED: resize2fs: exit 1"},
		{"off", func(f *adminv1.ImageFS) { f.Major, f.Minor = 254, 1 },
			"the kubelet sees 2.0 GiB, 1.0 GiB available, at /r/imagefs (device 254:1): not the pool's, the mirror is off"},
		{"not set up", func(f *adminv1.ImageFS) { f.Major, f.Minor, f.Error = 254, 1, "no loop device" },
			"the kubelet sees 2.0 GiB, 1.0 GiB available, at /r/imagefs (device 254:1): not the pool's; MIRROR FAILED: no loop device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := proto.Clone(&base).(*adminv1.ImageFS)
			tc.mod(f)
			if got := imageFS(f); got != tc.want {
				t.Errorf("imageFS =\n  %s\nwant\n  %s", got, tc.want)
			}
		})
	}
}
