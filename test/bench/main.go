// Command bench answers "is every snapshot call within 2x of overlayfs":
// it starts containerd with four snapshotters — overlayfs, the same
// overlayfs served as a proxy plugin (ovlproxy.go), thin (the
// thin-snapshotter daemon as a proxy plugin, embedded loopback pool) and
// containerd's built-in devmapper (on a loop thin pool of its own) — and
// runs the same workloads on each through containerd's snapshots service
// over containerd's socket, as ctr and CRI call it. It prints one table:
// median and p95 per operation per snapshotter, and the ratios
// thin/overlayfs, thin/overlayfs-proxy and devmapper/thin.
//
// It needs root and dm-thin: `make bench` runs it in the VM bench
// (test/vm/run) unless the host has dm-thin. A benchmark, not a test: it
// fails only when an operation fails, never on a time.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/internal/daemontest"
)

const (
	namespace  = "bench"
	dmPoolName = "bench-devmapper-pool"
)

// sizes are the workload sizes of one snapshotter.
type sizes struct {
	Layers     int // depth of the chain workload and of each parallel chain
	Chains     int // chains built at once
	Imports    int // image imports
	Runs       int // ctr run --rm
	Scale      int // existing snapshots for the scale workload
	ScaleIters int // Prepare/Commit/Remove rounds per scale point
}

type config struct {
	snapshotters   []string
	std, dm        sizes // dm: devmapper's, which is 10-50x slower
	walks          int
	containers     int
	fillPar        int
	imageFiles     int
	imageBigMiB    int
	gcTimeout      time.Duration
	gcSettle       time.Duration
	thinBin        string
	ctrdDir        string
	busybox        string
	disk           string
	dir            string
	out            string
	thinData       string
	thinBase       string
	dmData         int64
	thinSyncRemove bool
	rcuExpedited   bool
	workloads      []string
	rounds         int
	debug          bool
}

func (c *config) sizes(sn string) sizes {
	if sn == "devmapper" {
		return c.dm
	}
	return c.std
}

func parseFlags() *config {
	c := &config{}
	root := repoRoot()
	sns := flag.String("snapshotters", "overlayfs,"+ovlProxy+",thin,devmapper", "snapshotters to measure, comma-separated, in table order")
	flag.IntVar(&c.std.Layers, "layers", 20, "layers in the chain workload")
	flag.IntVar(&c.dm.Layers, "dm-layers", 4, "layers in the chain workload for devmapper")
	flag.IntVar(&c.std.Chains, "chains", 4, "chains built at once in the parallel workload")
	flag.IntVar(&c.dm.Chains, "dm-chains", 2, "chains built at once for devmapper")
	flag.IntVar(&c.walks, "walks", 10, "Walk calls in the chain workload")
	flag.IntVar(&c.containers, "containers", 16, "container snapshots prepared at once on the image's top layer")
	flag.IntVar(&c.std.Imports, "imports", 2, "image imports (each removed again before the next)")
	flag.IntVar(&c.dm.Imports, "dm-imports", 1, "image imports for devmapper")
	flag.IntVar(&c.std.Runs, "runs", 3, "ctr run --rm of /bin/true")
	flag.IntVar(&c.dm.Runs, "dm-runs", 2, "ctr run --rm for devmapper")
	flag.IntVar(&c.std.Scale, "scale", 500, "existing snapshots in the scale workload")
	flag.IntVar(&c.dm.Scale, "dm-scale", 20, "existing snapshots in the scale workload for devmapper")
	flag.IntVar(&c.std.ScaleIters, "scale-iters", 10, "Prepare/Commit/Remove rounds per scale point")
	flag.IntVar(&c.dm.ScaleIters, "dm-scale-iters", 3, "Prepare/Commit/Remove rounds per scale point for devmapper")
	flag.IntVar(&c.fillPar, "fill-parallel", 4, "snapshots made at once to reach the scale")
	flag.IntVar(&c.imageFiles, "image-files", 3000, "small files in the image")
	flag.IntVar(&c.imageBigMiB, "image-big-mib", 64, "size of the image's large file in MiB")
	flag.DurationVar(&c.gcTimeout, "gc-timeout", 30*time.Second, "longest wait for containerd's garbage collector to remove a backend snapshot before a forced collection")
	flag.DurationVar(&c.gcSettle, "gc-settle", 500*time.Millisecond, "pause after a backend removal before the next Remove, so that containerd's collection has ended")
	flag.StringVar(&c.thinBin, "thin", filepath.Join(root, "bin", "thin-snapshotter"), "thin-snapshotter binary")
	flag.StringVar(&c.ctrdDir, "containerd-dir", filepath.Join(root, ".bench", "containerd-v2.4.2"), "directory with containerd, ctr, containerd-shim-runc-v2")
	flag.StringVar(&c.busybox, "busybox", "/bin/busybox", "static busybox for the image")
	flag.StringVar(&c.disk, "disk", os.Getenv("THIN_TEST_DISK"), "scratch block device to format (ext4) and hold everything; empty: -dir")
	flag.StringVar(&c.dir, "dir", "", "work directory when there is no -disk (default: a temporary directory)")
	defOut := filepath.Join(root, ".bench", "bench-results.txt")
	if o := os.Getenv("THIN_VM_OUT"); o != "" {
		defOut = filepath.Join(o, "bench-results.txt")
	}
	flag.StringVar(&c.out, "out", defOut, "file to write the table to (besides stdout)")
	flag.StringVar(&c.thinData, "thin-data-size", "8GiB", "thin-snapshotter's embedded pool size")
	flag.StringVar(&c.thinBase, "base-size", "256MiB", "snapshot size, thin's base_size and devmapper's base_image_size")
	flag.BoolVar(&c.thinSyncRemove, "thin-sync-remove", false, "thin-snapshotter with async_remove = false (else the daemon's default)")
	flag.BoolVar(&c.rcuExpedited, "rcu-expedited", false, "set the kernel's rcu_expedited for the run (restored after): every dm table load and removal waits for an RCU grace period, which expedited ones shorten")
	flag.Int64Var(&c.dmData, "dm-data-gib", 8, "devmapper's pool size in GiB")
	wls := flag.String("workloads", "chain,parallel,image,scale", "workloads to run, comma-separated")
	flag.IntVar(&c.rounds, "rounds", 1, "rounds of all workloads; each row pools every round's samples, and even rounds take the snapshotters in reverse order (devmapper runs in the first round only)")
	flag.BoolVar(&c.debug, "debug", false, "debug logs from containerd and thin-snapshotter (slows both)")
	flag.Parse()
	c.snapshotters = strings.Split(*sns, ",")
	c.workloads = strings.Split(*wls, ",")
	return c
}

// repoRoot is the nearest directory above the working directory holding
// go.mod, or the working directory.
func repoRoot() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		if filepath.Dir(dir) == dir {
			return wd
		}
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s bench: %s\n", time.Now().UTC().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func main() {
	if len(os.Args) == 4 && os.Args[1] == serveOverlayArg {
		if err := serveOverlayProxy(os.Args[2], os.Args[3]); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", ovlProxy, err)
			os.Exit(1)
		}
		return
	}
	c := parseFlags()
	if err := runBench(c); err != nil {
		fmt.Fprintf(os.Stderr, "bench: FAILED: %v\n", err)
		os.Exit(1)
	}
}

// bench is the running stack and what was measured on it.
type bench struct {
	cfg      *config
	dir      string
	ctrdSock string
	ctx      context.Context // namespace and lease
	nsCtx    context.Context // namespace only
	lm       leases.Manager
	sn       map[string]snapshots.Snapshotter
	be       map[string]backend
	image    imageInfo
	thin     *daemontest.Daemon
	// thinMetrics is thin's metrics_address (thintimes.go).
	thinMetrics string
	ovlProxy    *daemontest.Daemon
	ctrd        *daemontest.Daemon

	mu      sync.Mutex
	samples Samples
	notes   []string
	// forcedGC counts per snapshotter the removals that containerd's
	// GC scheduler left behind (see removeAndWait).
	forcedGC map[string]int
}

func (b *bench) add(sn, op string, d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.samples.Add(sn, op, d)
}

func (b *bench) note(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.notes = append(b.notes, fmt.Sprintf(format, args...))
}

// timed runs fn and records its duration under op when it succeeds.
func (b *bench) timed(sn, op string, fn func() error) error {
	start := time.Now()
	if err := fn(); err != nil {
		return fmt.Errorf("%s %s: %w", sn, op, err)
	}
	b.add(sn, op, time.Since(start))
	return nil
}

func runBench(c *config) (err error) {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (and dm-thin): run it with make bench")
	}
	for _, sn := range c.snapshotters {
		if sn != "overlayfs" && sn != ovlProxy && sn != "thin" && sn != "devmapper" {
			return fmt.Errorf("unknown snapshotter %q (want overlayfs, %s, thin, devmapper)", sn, ovlProxy)
		}
	}
	for _, p := range []string{filepath.Join(c.ctrdDir, "containerd"), filepath.Join(c.ctrdDir, "ctr"), filepath.Join(c.ctrdDir, "containerd-shim-runc-v2"), c.thinBin, c.busybox} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%w (make bench builds it)", err)
		}
	}
	for _, p := range []string{"runc", "losetup", "dmsetup", "thin_ls", "mkfs.ext4"} {
		if _, err := exec.LookPath(p); err != nil {
			return err
		}
	}
	setupCtx := context.Background()
	t0 := time.Now()

	dir := c.dir
	switch {
	case c.disk != "":
		dir = "/tmp/thin-bench"
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		if _, err := run(setupCtx, "mkfs.ext4", "-q", "-F", c.disk); err != nil {
			return err
		}
		if err := unix.Mount(c.disk, dir, "ext4", 0, ""); err != nil {
			return fmt.Errorf("mount %s on %s: %w", c.disk, dir, err)
		}
		defer func() { _ = unix.Unmount(dir, unix.MNT_DETACH) }()
	case dir == "":
		if dir, err = os.MkdirTemp("", "thin-bench-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	b := &bench{cfg: c, dir: dir, sn: map[string]snapshots.Snapshotter{}, be: map[string]backend{}}
	restoreRCU, err := b.setRCUExpedited(c.rcuExpedited)
	if err != nil {
		return err
	}
	defer restoreRCU()

	before, err := allDMDevices(setupCtx)
	if err != nil {
		return err
	}
	var dm *dmPool
	defer func() {
		// Teardown: containerd first (it holds devmapper's devices), then
		// the daemon, then whatever dm devices and loops this run made.
		if b.ctrd != nil && !b.ctrd.Exited() {
			if serr := b.ctrd.Stop(time.Minute); serr != nil {
				logf("containerd: %v", serr)
			}
		}
		for _, d := range []*daemontest.Daemon{b.thin, b.ovlProxy} {
			if d != nil && !d.Exited() {
				if serr := d.Stop(time.Minute); serr != nil {
					logf("%s: %v", d.Name, serr)
				}
			}
		}
		if rerr := removeNewDevices(setupCtx, before); rerr != nil {
			logf("removing dm devices: %v", rerr)
		}
		if dm != nil {
			dm.detach(setupCtx)
		}
		if out := os.Getenv("THIN_VM_OUT"); out != "" {
			for _, d := range []*daemontest.Daemon{b.thin, b.ovlProxy, b.ctrd} {
				if d != nil {
					if data, rerr := os.ReadFile(d.Log); rerr == nil {
						_ = os.WriteFile(filepath.Join(out, filepath.Base(d.Log)), data, 0o644)
					}
				}
			}
		}
	}()

	has := func(sn string) bool { return slices.Contains(c.snapshotters, sn) }
	thinSock := filepath.Join(dir, "thin.sock")
	if has("thin") {
		if err := b.startThin(thinSock); err != nil {
			return err
		}
	}
	ovlProxySock, ovlProxyRoot := filepath.Join(dir, ovlProxy+".sock"), filepath.Join(dir, ovlProxy)
	if has(ovlProxy) {
		if err := b.startOverlayProxy(ovlProxyRoot, ovlProxySock); err != nil {
			return err
		}
	}
	if has("devmapper") {
		dm, err = createDMPool(setupCtx, filepath.Join(dir, "devmapper-pool"), dmPoolName, c.dmData<<30, 256<<20)
		if err != nil {
			return err
		}
	}
	b.ctrdSock = filepath.Join(dir, "containerd.sock")
	ctrdRoot := filepath.Join(dir, "containerd", "root")
	proxies := map[string]string{}
	if has("thin") {
		proxies["thin"] = thinSock
	}
	if has(ovlProxy) {
		proxies[ovlProxy] = ovlProxySock
	}
	if err := b.startContainerd(proxies, ctrdRoot, has("devmapper")); err != nil {
		return err
	}
	logf("stack up in %s: containerd %s, work dir %s", time.Since(t0).Round(time.Millisecond), b.ctrdSock, dir)
	plugins, err := b.ctr(setupCtx, "plugins", "ls")
	if err != nil {
		return err
	}
	for l := range strings.SplitSeq(plugins, "\n") {
		if strings.HasPrefix(l, "io.containerd.snapshotter.v1") {
			logf("  %s", strings.Join(strings.Fields(l), " "))
		}
	}

	conn, err := grpc.NewClient("unix://"+b.ctrdSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	nsCtx := namespaces.WithNamespace(context.Background(), namespace)
	// Snapshots that no image or container holds are garbage to
	// containerd: the bench's own are held by a lease, as a client
	// making a container holds its snapshot.
	b.nsCtx, b.lm = nsCtx, leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))
	lease, err := b.lm.Create(nsCtx, leases.WithRandomID(), leases.WithExpiration(24*time.Hour))
	if err != nil {
		return fmt.Errorf("create a lease: %w", err)
	}
	b.ctx = leases.WithLease(nsCtx, lease.ID)
	for _, sn := range c.snapshotters {
		// What containerd's client.SnapshotService(sn) returns: the
		// snapshots service over containerd's own connection.
		b.sn[sn] = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), sn)
		switch sn {
		case "overlayfs":
			b.be[sn] = overlayBackend(filepath.Join(ctrdRoot, "io.containerd.snapshotter.v1.overlayfs", "snapshots"))
		case ovlProxy:
			b.be[sn] = overlayBackend(filepath.Join(ovlProxyRoot, "snapshots"))
		case "devmapper":
			b.be[sn] = devmapperBackend(dm)
		case "thin":
			tc, err := grpc.NewClient("unix://"+thinSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return err
			}
			defer tc.Close()
			b.be[sn] = thinBackend{sn: proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(tc), "thin"), ns: namespace}
		}
	}

	if b.image, err = writeImage(filepath.Join(dir, "image"), c); err != nil {
		return err
	}
	logf("image %s: %d layers, %d MiB tar", b.image.ref, len(b.image.chainIDs), b.image.tarSize>>20)

	workloads := []workload{
		{"chain", b.chain},
		{"parallel", b.parallel},
		{"image", b.imageWorkload},
		{"scale", b.scale},
	}
	for _, w := range c.workloads {
		if !slices.ContainsFunc(workloads, func(x workload) bool { return x.name == w }) {
			return fmt.Errorf("unknown workload %q (want chain, parallel, image, scale)", w)
		}
	}
	// Each workload runs on every snapshotter before the next workload:
	// the VM's speed drifts, and neighbours in time compare best. Rounds
	// after the first alternate the order, so that no snapshotter always
	// runs first.
	if c.rounds < 1 {
		return fmt.Errorf("-rounds %d: want 1 or more", c.rounds)
	}
	for round := 1; round <= c.rounds; round++ {
		if err := b.round(round, workloads); err != nil {
			return err
		}
	}

	report := b.report(time.Since(t0))
	fmt.Print(report)
	if c.out != "" {
		if err := os.MkdirAll(filepath.Dir(c.out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(c.out, []byte(report), 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(strings.TrimSuffix(c.out, ".txt")+".csv", []byte(b.csv()), 0o644); err != nil {
			return err
		}
		logf("wrote %s", c.out)
	}
	return nil
}

// workload is one of the bench's workloads, run on one snapshotter.
type workload struct {
	name string
	fn   func(sn string) error
}

// round runs the chosen workloads on every snapshotter, in reverse order
// in even rounds; devmapper only in the first.
func (b *bench) round(round int, workloads []workload) error {
	c := b.cfg
	sns := slices.Clone(c.snapshotters)
	if round%2 == 0 {
		slices.Reverse(sns)
	}
	if round > 1 {
		sns = slices.DeleteFunc(sns, func(sn string) bool { return sn == "devmapper" })
	}
	label := ""
	if c.rounds > 1 {
		label = fmt.Sprintf(" (round %d)", round)
	}
	for _, w := range workloads {
		if !slices.Contains(c.workloads, w.name) {
			continue
		}
		for _, sn := range sns {
			var (
				before thinTimes
				err    error
			)
			if sn == "thin" {
				if before, err = scrapeThin(b.nsCtx, b.thinMetrics); err != nil {
					return err
				}
			}
			start := time.Now()
			logf("%s on %s%s ...", w.name, sn, label)
			if err := w.fn(sn); err != nil {
				return fmt.Errorf("%s on %s: %w\n%s", w.name, sn, err, b.logTails(sn))
			}
			logf("%s on %s done in %s", w.name, sn, time.Since(start).Round(time.Millisecond))
			b.note("%s on %s%s: %s wall", w.name, sn, label, time.Since(start).Round(100*time.Millisecond))
			if before != nil {
				after, err := scrapeThin(b.nsCtx, b.thinMetrics)
				if err != nil {
					return err
				}
				b.note("%s on thin%s, by the daemon: %s", w.name, label, after.since(before))
			}
		}
	}
	return nil
}

func (b *bench) logTails(sn string) string {
	var s []string
	if sn == "thin" && b.thin != nil {
		s = append(s, b.thin.Tail(30))
	}
	if b.ctrd != nil {
		s = append(s, b.ctrd.Tail(30))
	}
	return strings.Join(s, "\n")
}

func (b *bench) report(total time.Duration) string {
	c := b.cfg
	var r strings.Builder
	fmt.Fprintf(&r, "containerd snapshot calls, ms (median, p95, samples); kernel %s; %s UTC\n",
		kernelRelease(), time.Now().UTC().Format("2006-01-02 15:04"))
	runs := "one run"
	if c.rounds > 1 {
		runs = fmt.Sprintf("%d rounds in one run, each row's samples pooled", c.rounds)
	}
	fmt.Fprintf(&r, "through containerd's snapshots service (%s); one containerd, %s\n\n", b.ctrdVersion(), runs)
	var ratios []Ratio
	has := map[string]bool{}
	for _, sn := range c.snapshotters {
		has[sn] = true
	}
	if has["thin"] && has["overlayfs"] {
		ratios = append(ratios, Ratio{"thin", "overlayfs"})
	}
	if has["thin"] && has[ovlProxy] {
		ratios = append(ratios, Ratio{"thin", ovlProxy})
	}
	if has["devmapper"] && has["thin"] {
		ratios = append(ratios, Ratio{"devmapper", "thin"})
	}
	r.WriteString(FormatTable(&b.samples, c.snapshotters, ratios))
	fmt.Fprintf(&r, "\nsizes: chain %d layers (devmapper %d); %d chains of %d at once (devmapper %d of %d); %d container snapshots at once;\n",
		c.std.Layers, c.dm.Layers, c.std.Chains, c.std.Layers, c.dm.Chains, c.dm.Layers, c.containers)
	fmt.Fprintf(&r, "  %d imports, %d runs (devmapper %d, %d); scale N = %d existing snapshots, %d rounds (devmapper N = %d, %d rounds)\n",
		c.std.Imports, c.std.Runs, c.dm.Imports, c.dm.Runs, c.std.Scale, c.std.ScaleIters, c.dm.Scale, c.dm.ScaleIters)
	fmt.Fprintf(&r, "  image: %d layers, %d small files, one %d MiB file, %d MiB tar\n",
		len(b.image.chainIDs), c.imageFiles, c.imageBigMiB, b.image.tarSize>>20)
	r.WriteString("\"+GC\": from containerd's Remove until the backend no longer holds the snapshot (containerd's GC scheduler included)\n")
	fmt.Fprintf(&r, "Walk: all %d snapshots of the chain workload (devmapper %d); \"N existing\": N = scale above\n", 3*c.std.Layers, 3*c.dm.Layers)
	for _, sn := range c.snapshotters {
		if n := b.forcedGC[sn]; n > 0 {
			fmt.Fprintf(&r, "  %s: %d removals not collected by containerd's GC within %s needed a forced collection (not in the samples)\n", sn, n, c.gcTimeout)
		}
	}
	for _, n := range b.notes {
		r.WriteString("  " + n + "\n")
	}
	fmt.Fprintf(&r, "total %s\n", total.Round(time.Second))
	return r.String()
}

// csv is every sample, for a closer look.
func (b *bench) csv() string {
	var r strings.Builder
	r.WriteString("snapshotter,operation,ms\n")
	for _, sn := range b.cfg.snapshotters {
		for _, op := range b.samples.Ops {
			for _, d := range b.samples.Data[sn][op] {
				fmt.Fprintf(&r, "%s,%q,%.3f\n", sn, op, float64(d)/float64(time.Millisecond))
			}
		}
	}
	return r.String()
}

func (b *bench) ctrdVersion() string {
	out, err := exec.Command(filepath.Join(b.cfg.ctrdDir, "containerd"), "--version").Output()
	if err != nil {
		return "containerd ?"
	}
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return "containerd " + f[2]
	}
	return strings.TrimSpace(string(out))
}

// rcuExpeditedFile switches the kernel's RCU grace periods to expedited
// ones. A dm thin table load and a thin device's removal each wait for a
// grace period, the largest part of an activation.
const rcuExpeditedFile = "/sys/kernel/rcu_expedited"

// setRCUExpedited notes the kernel's rcu_expedited under the table and, with
// on, sets it for the run; the returned func puts the old value back.
func (b *bench) setRCUExpedited(on bool) (func(), error) {
	old, err := os.ReadFile(rcuExpeditedFile)
	if err != nil {
		return nil, err
	}
	was := strings.TrimSpace(string(old))
	if !on || was == "1" {
		b.note("kernel: rcu_expedited=%s", was)
		return func() {}, nil
	}
	if err := os.WriteFile(rcuExpeditedFile, []byte("1"), 0o644); err != nil {
		return nil, err
	}
	b.note("kernel: rcu_expedited=1 for this run (-rcu-expedited; it was %s)", was)
	return func() {
		if err := os.WriteFile(rcuExpeditedFile, []byte(was), 0o644); err != nil {
			logf("restoring %s: %v", rcuExpeditedFile, err)
		}
	}, nil
}
