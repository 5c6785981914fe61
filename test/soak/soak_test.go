// Package soak kill -9's a running thin-snapshotter daemon under a
// concurrent workload, again and again, and checks after every restart that
// nothing acknowledged was lost and nothing unacknowledged was left halfway.
// It needs root and dm-thin: run it in the VM bench (make test-soak).
package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

var (
	flagRounds       = flag.Int("soak.rounds", envInt("THIN_SOAK_ROUNDS", 30), "kill -9 rounds (env THIN_SOAK_ROUNDS)")
	flagWorkers      = flag.Int("soak.workers", envInt("THIN_SOAK_WORKERS", 4), "concurrent workload goroutines (env THIN_SOAK_WORKERS)")
	flagCheckEvery   = flag.Int("soak.check-every", envInt("THIN_SOAK_CHECK_EVERY", 5), "graceful stop and offline check every N rounds (env THIN_SOAK_CHECK_EVERY)")
	flagRebootEvery  = flag.Int("soak.reboot-every", envInt("THIN_SOAK_REBOOT_EVERY", 10), "reboot simulation every N rounds (env THIN_SOAK_REBOOT_EVERY)")
	flagContentEvery = flag.Int("soak.content-every", envInt("THIN_SOAK_CONTENT_EVERY", 1), "mount and read every snapshot every N rounds (env THIN_SOAK_CONTENT_EVERY)")
	flagSeed         = flag.Uint64("soak.seed", uint64(envInt("THIN_SOAK_SEED", 0)), "random seed, 0 for the time (env THIN_SOAK_SEED)")
	flagCrashCheck   = flag.Bool("soak.crash-check", os.Getenv("THIN_SOAK_CRASH_CHECK") != "0", "run `check --json` on every crashed state before the restart (env THIN_SOAK_CRASH_CHECK=0 disables)")
	flagSuite        = flag.Bool("soak.suite", os.Getenv("THIN_SOAK_SUITE") != "0", "run containerd's testsuite against fresh daemons afterwards (env THIN_SOAK_SUITE=0 disables)")
)

const startTimeout = 2 * time.Minute

// daemonBin is the prebuilt daemon: $THIN_SNAPSHOTTER_BIN, else the
// repository's bin/thin-snapshotter (the test runs in test/soak).
func daemonBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("THIN_SNAPSHOTTER_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "bin", "thin-snapshotter")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(abs); err != nil || fi.Mode()&0o111 == 0 {
		t.Fatalf("daemon binary %s missing or not executable (build it: go build -o bin/thin-snapshotter ./cmd/thin-snapshotter, or set THIN_SNAPSHOTTER_BIN): %v", abs, err)
	}
	return abs
}

func TestIntegrationSoakKill9(t *testing.T) {
	dmtest.Require(t)
	bin := daemonBin(t)
	ctx := context.Background()
	began := time.Now()

	seed := *flagSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("soak: %d rounds, %d workers, check every %d, reboot every %d, seed %d (rerun with -soak.seed %d)",
		*flagRounds, *flagWorkers, *flagCheckEvery, *flagRebootEvery, seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	dir := t.TempDir()
	mntBase := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mntBase, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(bin, dir, smallConfig)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := snapshotter.LoopPoolName(d.root)
	if err != nil {
		t.Fatal(err)
	}
	useCheck := hasCheck(ctx, bin)
	if useCheck {
		t.Log("soak: the daemon has `check`: offline checks run it as well as the test's own invariants")
	} else {
		t.Log("soak: the daemon has no `check` subcommand yet: offline checks use the test's own invariants only")
	}
	cleaned := false
	t.Cleanup(func() {
		saveLog(t, d)
		if cleaned {
			return
		}
		_ = d.kill()
		unmountAllUnder(mntBase)
		if err := dmtest.DestroyLoopPool(ctx, pool, filepath.Join(d.root, "pool")); err != nil {
			t.Errorf("cleanup: destroy pool %s: %v", pool, err)
		}
	})

	if err := d.start(ctx, startTimeout); err != nil {
		t.Fatalf("first start: %v", err)
	}
	m := newModel()

	var (
		kills, reboots, offlineChecks, mounted int
		totalOps                               int
		restartTotal, restartMax               time.Duration
		recovered                              = map[string]int{}
		crashFindings                          = map[string]int{}
	)
	for round := 1; round <= *flagRounds; round++ {
		rctx, cancel := context.WithCancel(ctx)
		var (
			wg     sync.WaitGroup
			fmu    sync.Mutex
			fatals []error
		)
		var stop atomic.Bool
		workers := make([]*worker, *flagWorkers)
		for i := range workers {
			workers[i] = &worker{
				id: i, round: round, m: m, sn: d.sn, mntBase: mntBase, cap: 8, stop: &stop,
				rng: rand.New(rand.NewPCG(seed, uint64(round)<<8|uint64(i))),
				fatal: func(err error) {
					fmu.Lock()
					fatals = append(fatals, err)
					fmu.Unlock()
				},
			}
			wg.Go(func() { ; workers[i].run(rctx) })
		}
		delay := time.Duration(50+rng.IntN(1451)) * time.Millisecond
		time.Sleep(delay)
		if !d.alive() {
			cancel()
			wg.Wait()
			t.Fatalf("round %d: the daemon died on its own; log tail:\n%s", round, d.logTail(8192))
		}
		stop.Store(true)
		if err := d.kill(); err != nil {
			t.Fatalf("round %d: kill: %v", round, err)
		}
		kills++
		cancel()
		wg.Wait()
		ops := 0
		for _, w := range workers {
			ops += w.ops
		}
		totalOps += ops
		if left := mountsUnder(mntBase); len(left) > 0 {
			t.Fatalf("round %d: workload left mounts: %v", round, left)
		}
		if len(fatals) > 0 {
			t.Fatalf("round %d: workload failures: %v", round, errors.Join(fatals...))
		}

		if useCheck && *flagCrashCheck {
			crashCheck(t, ctx, d, round, crashFindings)
		}

		reboot := *flagRebootEvery > 0 && round%*flagRebootEvery == 0
		withPool := reboot && (round / *flagRebootEvery)%2 == 0
		if reboot {
			if err := simulateReboot(ctx, pool, withPool); err != nil {
				t.Fatalf("round %d: reboot simulation: %v", round, err)
			}
			reboots++
		}

		t0 := time.Now()
		if err := d.start(ctx, startTimeout); err != nil {
			t.Fatalf("round %d: restart after kill -9 (recovery): %v", round, err)
		}
		took := time.Since(t0)
		restartTotal += took
		restartMax = max(restartMax, took)
		recov := d.linesOfLastStart("recovery:")
		for _, l := range recov {
			recovered[recoveryAction(l)]++
		}

		if err := m.resolve(ctx, d.sn); err != nil {
			t.Fatalf("round %d: unacked operations: %v", round, err)
		}
		if err := m.verifyStructure(ctx, d.sn); err != nil {
			t.Fatalf("round %d: snapshots after restart: %v", round, err)
		}
		if reboot {
			re := 0
			for _, l := range recov {
				if strings.Contains(l, "reactivated device") {
					re++
				}
			}
			if want := m.devicesToActivate(); re != want {
				t.Fatalf("round %d: after the reboot simulation recovery reactivated %d devices, want %d (actives, and layers with views)", round, re, want)
			}
		}
		if reboot || *flagContentEvery > 0 && round%*flagContentEvery == 0 || round == *flagRounds {
			n, err := m.verifyContent(ctx, d.sn, mntBase, "r"+strconv.Itoa(round))
			if err != nil {
				t.Fatalf("round %d: contents after restart: %v", round, err)
			}
			mounted += n
		}
		c := m.counts()
		t.Logf("round %d: killed after %v (%d ops), restart %v, %d recovery actions%s; now %d committed, %d active, %d views",
			round, delay, ops, took.Round(time.Millisecond), len(recov), map[bool]string{true: fmt.Sprintf(", reboot simulated (pool removed too: %v)", withPool)}[reboot],
			c[snapshots.KindCommitted], c[snapshots.KindActive], c[snapshots.KindView])

		if *flagCheckEvery > 0 && round%*flagCheckEvery == 0 || round == *flagRounds {
			if err := d.stop(time.Minute); err != nil {
				t.Fatalf("round %d: graceful stop: %v", round, err)
			}
			checkOffline(t, ctx, d, pool, m, useCheck, fmt.Sprintf("round %d", round))
			offlineChecks++
			if err := d.start(ctx, startTimeout); err != nil {
				t.Fatalf("round %d: start after check: %v", round, err)
			}
		}
	}

	// After all the kills the daemon still does the basics right.
	if err := sanity(ctx, d.sn, mntBase); err != nil {
		t.Fatalf("after the soak: %v", err)
	}
	if err := d.stop(time.Minute); err != nil {
		t.Fatalf("final stop: %v", err)
	}
	checkOffline(t, ctx, d, pool, m, useCheck, "final")
	offlineChecks++

	m.mu.Lock()
	t.Logf("soak summary: %d rounds, %d kill -9, %d reboot simulations, %d offline checks (daemon check: %v), %d daemon starts, %d workload ops; acked %v; unacked %v; resolved %v; %d snapshot mounts verified; restart avg %v max %v; %v wall",
		*flagRounds, kills, reboots, offlineChecks, useCheck, d.starts, totalOps, opCounts(m.acked), opCounts(m.unacked), m.resolved, mounted,
		(restartTotal / time.Duration(max(kills, 1))).Round(time.Millisecond), restartMax.Round(time.Millisecond), time.Since(began).Round(time.Second))
	t.Logf("unacked errors by kind: %v; recovery actions: %v; check findings on the crashed states (before restart): %v", m.errKinds, recovered, crashFindings)
	for _, o := range m.odd {
		t.Logf("unacked with an error other than the daemon's death: %s", o)
	}
	m.mu.Unlock()

	if err := dmtest.DestroyLoopPool(ctx, pool, filepath.Join(d.root, "pool")); err != nil {
		t.Fatalf("destroy pool: %v", err)
	}
	cleaned = true
	if err := assertNoLeftovers(pool, dir); err != nil {
		t.Fatal(err)
	}

	if !*flagSuite {
		t.Log("soak: containerd testsuite NOT run (THIN_SOAK_SUITE=0)")
		return
	}
	if f := flag.Lookup("test.skip"); f != nil && f.Value.String() != "" {
		t.Logf("soak: containerd testsuite cases matching -test.skip %q do NOT run", f.Value.String())
	}
	t.Run("containerd-testsuite", func(t *testing.T) {
		suiteAfterSoak(t, bin)
	})
}

// recoveryAction is the message of a recovery log line.
func recoveryAction(line string) string {
	_, after, _ := strings.Cut(line, "recovery: ")
	msg := after
	if j := strings.IndexByte(msg, '"'); j >= 0 {
		msg = msg[:j]
	}
	return msg
}

func opCounts(c map[opKind]int) string {
	return fmt.Sprintf("prepare=%d view=%d commit=%d remove=%d", c[opPrepare], c[opView], c[opCommit], c[opRemove])
}

// checkOffline runs the test's invariants and, when the daemon has it,
// `check --json` on the stopped daemon; both must be clean.
func checkOffline(t *testing.T, ctx context.Context, d *daemon, pool string, m *model, useCheck bool, when string) {
	t.Helper()
	problems, err := offlineCheck(ctx, d.root, pool, m)
	if err != nil {
		t.Fatalf("%s: offline check: %v", when, err)
	}
	if len(problems) > 0 {
		t.Fatalf("%s: offline check found %d problems:\n  %s", when, len(problems), strings.Join(problems, "\n  "))
	}
	if !useCheck {
		return
	}
	r, out, code, err := runCheck(ctx, d)
	if err != nil {
		t.Fatalf("%s: thin-snapshotter check: %v", when, err)
	}
	if !r.Clean || code != 0 || len(r.Findings) > 0 {
		t.Fatalf("%s: thin-snapshotter check not clean (exit %d):\n%s", when, code, out)
	}
	if r.Pool != pool || r.Records != len(m.snaps) {
		t.Fatalf("%s: thin-snapshotter check saw pool %q with %d records, want %q with %d", when, r.Pool, r.Records, pool, len(m.snaps))
	}
}

// allowedAfterCrash may be reported by check on a state a kill left: work in
// flight that the journal explains. Anything else (a ghost, an orphan, a
// wrong device...) means a crash at that moment loses or leaks something.
var allowedAfterCrash = map[string]bool{
	"pending_journal": true, "not_ready": true, "stale_device": true,
	"missing_device": true, "txid_mismatch": true, "leaked_id": true,
}

// crashCheck runs `check --json` (no repair) on the state the kill left.
func crashCheck(t *testing.T, ctx context.Context, d *daemon, round int, seen map[string]int) {
	t.Helper()
	r, out, code, err := runCheck(ctx, d)
	if err != nil {
		t.Fatalf("round %d: check on the crashed state: %v", round, err)
	}
	var bad []string
	kinds := map[string]int{}
	for _, raw := range r.Findings {
		var f struct {
			Kind string `json:"kind"`
		}
		if err := json.Unmarshal(raw, &f); err != nil {
			t.Fatalf("round %d: check finding %s: %v", round, raw, err)
		}
		seen[f.Kind]++
		kinds[f.Kind]++
		if !allowedAfterCrash[f.Kind] {
			bad = append(bad, string(raw))
		}
	}
	// The pool may be ahead of the database only by operations in flight.
	if kinds["txid_mismatch"] > 0 && kinds["pending_journal"] == 0 {
		bad = append(bad, "txid_mismatch without any pending journal entry")
	}
	if len(bad) > 0 {
		t.Fatalf("round %d: check on the crashed state (exit %d) found what no crash may leave:\n  %s\nfull report:\n%s", round, code, strings.Join(bad, "\n  "), out)
	}
}

// simulateReboot removes what a reboot loses: the thin devices, and with
// withPool the pool device too (its loop devices detach with it). The next
// start re-attaches the pool files and reactivates the devices.
func simulateReboot(ctx context.Context, pool string, withPool bool) error {
	if err := dmtest.RemoveDevices(ctx, dmsetup.DeviceNamePrefix(pool)); err != nil {
		return err
	}
	if !withPool {
		return nil
	}
	c, err := dmsetup.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Remove(ctx, pool, dmsetup.RemoveOptions{})
}

// sanity runs Prepare, write, Commit, View, read, Remove once more.
func sanity(ctx context.Context, sn snapshots.Snapshotter, mntBase string) error {
	const a, c, v = "sanity-active", "sanity-committed", "sanity-view"
	mounts, err := sn.Prepare(ctx, a, "")
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	if err := withMount(mntBase, mounts, func(dir string) error { return writeMarker(dir, a) }); err != nil {
		return err
	}
	if err := sn.Commit(ctx, c, a); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if mounts, err = sn.View(ctx, v, c); err != nil {
		return fmt.Errorf("view: %w", err)
	}
	if err := withMount(mntBase, mounts, func(dir string) error { return verifyMarkers(dir, []string{a}) }); err != nil {
		return err
	}
	if err := sn.Remove(ctx, c); err == nil {
		return errors.New("removing a committed snapshot with a view on it succeeded")
	}
	for _, k := range []string{v, c} {
		if err := sn.Remove(ctx, k); err != nil {
			return fmt.Errorf("remove %s: %w", k, err)
		}
	}
	return nil
}

func mountsUnder(base string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], base+"/") {
			out = append(out, fields[4])
		}
	}
	return out
}

func unmountAllUnder(base string) {
	for _, p := range mountsUnder(base) {
		_ = mount.UnmountAll(p, 0)
	}
}

// assertNoLeftovers checks no dm device of the pool and no loop device on
// a file under dir is left.
func assertNoLeftovers(pool, dir string) error {
	c, err := dmsetup.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []string
		devs, err := c.List()
		if err != nil {
			return err
		}
		for _, d := range devs {
			if strings.HasPrefix(d.Name, pool) {
				left = append(left, "dm "+d.Name)
			}
		}
		files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
				left = append(left, filepath.Base(filepath.Dir(filepath.Dir(f)))+" on "+strings.TrimSpace(string(b)))
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("left behind: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// saveLog copies the daemon log to the bench's output directory.
func saveLog(t *testing.T, d *daemon) {
	out := os.Getenv("THIN_VM_OUT")
	if out == "" {
		t.Logf("daemon log: %s", d.logPath)
		return
	}
	b, err := os.ReadFile(d.logPath)
	if err == nil {
		dst := filepath.Join(out, "soak-daemon.log")
		if err = os.WriteFile(dst, b, 0o644); err == nil {
			t.Logf("daemon log saved to %s (test/vm/run --out DIR copies it)", dst)
		}
	}
	if err != nil {
		t.Logf("saving daemon log: %v", err)
	}
}

// suiteAfterSoak runs containerd's snapshotter testsuite, each case against
// a fresh daemon process from the same binary, with its own pool.
func suiteAfterSoak(t *testing.T, bin string) {
	testsuite.SnapshotterSuite(t, "thin-daemon", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		d, err := newDaemon(bin, root, "[pool]\ndata_size = '1GiB'\nmetadata_size = '16MiB'\n[snapshot]\nbase_size = '64MiB'\n")
		if err != nil {
			return nil, nil, err
		}
		pool, err := snapshotter.LoopPoolName(d.root)
		if err != nil {
			return nil, nil, err
		}
		destroy := func() error {
			return errors.Join(
				dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(d.root, "pool")),
				assertNoLeftovers(pool, root))
		}
		if err := d.start(ctx, startTimeout); err != nil {
			return nil, nil, errors.Join(err, destroy())
		}
		return d.sn, func() error {
			return errors.Join(d.stop(time.Minute), destroy())
		}, nil
	})
}
