// Package e2e runs the whole stack on a real dm-thin kernel: thin-snapshotter
// and containerd 2.4.2 as processes.
//
//   - e2e_test.go (ctr): an image imported with
//     `ctr images import --snapshotter thin`, containers run with
//     `ctr run --snapshotter thin`, and the pool checked empty afterwards.
//   - cri_test.go (CRI): containerd configured by contrib/containerd's files,
//     crictl as a kubelet, images pulled from a registry in the VM, pods on
//     CNI bridge networking, on ext4 and on xfs.
//
// harness_test.go starts the daemons and inspects the pool; image_test.go is
// the test image and the checks a container runs on it.
//
// Run it with `make test-e2e` (in the VM bench). It needs the
// thin-snapshotter binary (THIN_E2E_SNAPSHOTTER, default bin/thin-snapshotter
// of the repository), containerd, ctr and containerd-shim-runc-v2
// (THIN_E2E_CONTAINERD_DIR, default .bench/containerd-v2.4.2), runc, a static
// busybox (THIN_E2E_BUSYBOX, default /bin/busybox) and thin_ls; the CRI case
// also crictl, crane and the CNI plugins bridge, loopback and host-local
// (THIN_E2E_CRI_TOOLS, default .bench/cri-tools; test/e2e/ensure-cri-tools).
// In the VM, CRI needs "/" to be a mount point: test/vm/run with
// THIN_VM_CMDLINE=thin_vm.switch_root, and THIN_VM_MODULES="bridge veth".
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/daemontest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

const namespace = "default"

// require fails (in the VM bench) or skips (elsewhere) when something the
// test needs is missing.
func require(t *testing.T, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if os.Getenv(dmtest.RequireEnv) == "1" {
		t.Fatalf("%s=1 but %s", dmtest.RequireEnv, msg)
	}
	t.Skip(msg)
}

// repoRoot is the nearest directory above the working directory holding
// go.mod.
func repoRoot(t *testing.T) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

func executable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

type tools struct {
	thin, containerd, ctr, ctrdDir, busybox, thinLs string
}

func findTools(t *testing.T) tools {
	root := repoRoot(t)
	env := func(key, def string) string {
		if v := os.Getenv(key); v != "" {
			return v
		}
		return def
	}
	var tl tools
	tl.thin = env("THIN_E2E_SNAPSHOTTER", filepath.Join(root, "bin", "thin-snapshotter"))
	tl.ctrdDir = env("THIN_E2E_CONTAINERD_DIR", filepath.Join(root, ".bench", "containerd-v2.4.2"))
	tl.containerd = filepath.Join(tl.ctrdDir, "containerd")
	tl.ctr = filepath.Join(tl.ctrdDir, "ctr")
	tl.busybox = env("THIN_E2E_BUSYBOX", "/bin/busybox")
	for _, p := range []string{tl.thin, tl.containerd, tl.ctr, filepath.Join(tl.ctrdDir, "containerd-shim-runc-v2"), tl.busybox} {
		require(t, executable(p), "%s is missing (make test-e2e builds it)", p)
	}
	_, err := exec.LookPath("runc")
	require(t, err == nil, "runc is not in PATH (apt-get install runc)")
	tl.thinLs, err = exec.LookPath("thin_ls")
	require(t, err == nil, "thin_ls is not in PATH (apt-get install thin-provisioning-tools)")
	return tl
}

// startDaemon starts a daemon for t; at the end its log is copied to
// $THIN_VM_OUT, which the VM bench copies to the host (test/vm/run --out).
func startDaemon(t *testing.T, name, logPath string, env []string, bin string, args ...string) *daemontest.Daemon {
	t.Helper()
	if out := os.Getenv("THIN_VM_OUT"); out != "" {
		t.Cleanup(func() {
			if data, err := os.ReadFile(logPath); err == nil {
				_ = os.WriteFile(filepath.Join(out, filepath.Base(logPath)), data, 0o644)
			}
		})
	}
	d, err := daemontest.Start(name, logPath, env, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// tail logs the last lines of d's log.
func tail(t *testing.T, d *daemontest.Daemon, lines int) {
	t.Helper()
	t.Log(d.Tail(lines))
}

func waitSocket(t *testing.T, d *daemontest.Daemon, sock string, timeout time.Duration) {
	t.Helper()
	if err := d.WaitSocket(sock, timeout); err != nil {
		t.Fatal(err)
	}
}

func waitReady(t *testing.T, d *daemontest.Daemon, notify *net.UnixConn, timeout time.Duration) {
	t.Helper()
	if err := d.WaitReady(notify, timeout); err != nil {
		t.Fatal(err)
	}
}

// startThin starts thin-snapshotter and waits until it is ready.
func (s *stack) startThin(logName string) {
	t := s.t
	t.Helper()
	// READY=1 on NOTIFY_SOCKET is the daemon's word that it serves; the
	// socket file alone appears before the pool and base device are set up.
	notifyPath := filepath.Join(s.dir, "notify-"+logName+".sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	// Open for the daemon's lifetime: it also says STOPPING=1.
	t.Cleanup(func() { notify.Close() })
	start := time.Now()
	s.thin = startDaemon(t, "thin-snapshotter", filepath.Join(s.dir, logName), []string{"NOTIFY_SOCKET=" + notifyPath},
		s.tl.thin, "--config", s.thinCfg)
	waitReady(t, s.thin, notify, 3*time.Minute)
	waitSocket(t, s.thin, s.thinSock, time.Minute)
	t.Logf("thin-snapshotter ready (sd_notify) and serving %s (pool %s) after %s", s.thinSock, s.pool, time.Since(start).Round(time.Millisecond))
}

// stack is the running thin-snapshotter + containerd pair.
type stack struct {
	t          *testing.T
	tl         tools
	dir        string
	ns         string
	thinRoot   string
	pool       string
	poolGone   bool
	thinCfg    string
	thinSock   string
	ctrdSock   string
	thin, ctrd *daemontest.Daemon
}

func (s *stack) ctr(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := append([]string{"--address", s.ctrdSock, "--namespace", s.ns}, args...)
	out, err := exec.CommandContext(ctx, s.tl.ctr, full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (s *stack) mustCtr(timeout time.Duration, args ...string) string {
	s.t.Helper()
	out, err := s.ctr(timeout, args...)
	if err != nil {
		tail(s.t, s.thin, 30)
		tail(s.t, s.ctrd, 30)
		s.t.Fatal(err)
	}
	return out
}

const thinConfig = `root = %q
address = %q
log_level = 'debug'

%s`

// The ctr case's pool and snapshot settings.
const ctrThinSettings = `[pool]
data_size = '2GiB'
metadata_size = '128MiB'

[snapshot]
base_size = '512MiB'
`

const containerdConfig = `version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[proxy_plugins.thin]
  type = "snapshot"
  address = %q

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "thin"
  differ = "walking"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
`

// stackOptions says how startStackWith sets the stack up.
type stackOptions struct {
	// thinSettings: the [pool] and [snapshot] tables of thin-snapshotter's
	// config (root and address are the stack's).
	thinSettings string
	// containerdConfig returns containerd's config file and extra
	// command-line arguments for the stack.
	containerdConfig func(s *stack) (string, []string)
	// namespace for ctr and the snapshots client.
	namespace string
	// cleanup removes, after a failure and before containerd stops, what
	// may still hold thin devices.
	cleanup func(s *stack)
}

// startStack starts the ctr case's stack: containerd without CRI.
func startStack(t *testing.T, tl tools) *stack {
	return startStackWith(t, tl, stackOptions{
		thinSettings: ctrThinSettings,
		namespace:    namespace,
		containerdConfig: func(s *stack) (string, []string) {
			return fmt.Sprintf(containerdConfig, filepath.Join(s.dir, "containerd", "root"), filepath.Join(s.dir, "containerd", "state"),
				s.ctrdSock, s.thinSock), nil
		},
		cleanup: func(s *stack) {
			for _, id := range []string{"e2e-check", "e2e-sleeper", "e2e-persist", "e2e-par-0", "e2e-par-1", "e2e-par-2", "e2e-par-3"} {
				_, _ = s.ctr(time.Minute, "tasks", "rm", "--force", id)
				_, _ = s.ctr(time.Minute, "containers", "rm", id)
			}
		},
	})
}

func startStackWith(t *testing.T, tl tools, opts stackOptions) *stack {
	dir := t.TempDir()
	s := &stack{
		t:        t,
		tl:       tl,
		dir:      dir,
		ns:       opts.namespace,
		thinRoot: filepath.Join(dir, "thin"),
		thinSock: filepath.Join(dir, "thin.sock"),
		ctrdSock: filepath.Join(dir, "containerd.sock"),
	}
	thinRoot := s.thinRoot
	pool, err := snapshotter.LoopPoolName(thinRoot)
	if err != nil {
		t.Fatal(err)
	}
	s.pool = pool
	// Registered first, so it runs last: whatever happened, the pool and
	// its loop devices go.
	t.Cleanup(func() {
		if s.poolGone {
			return
		}
		ctx := context.Background()
		if err := dmtest.DestroyLoopPool(ctx, pool, filepath.Join(thinRoot, "pool")); err != nil {
			t.Errorf("destroy pool %s: %v", pool, err)
		}
	})

	thinCfg := filepath.Join(dir, "thin.toml")
	if err := os.WriteFile(thinCfg, fmt.Appendf(nil, thinConfig, thinRoot, s.thinSock, opts.thinSettings), 0o644); err != nil {
		t.Fatal(err)
	}
	s.thinCfg = thinCfg
	t.Cleanup(func() {
		if s.thin == nil {
			return
		}
		if !s.thin.Exited() {
			_ = s.thin.Stop(30 * time.Second)
		}
		if t.Failed() {
			tail(t, s.thin, 60)
		}
	})
	s.startThin("thin.log")

	ctrdCfg := filepath.Join(dir, "containerd.toml")
	cfg, args := opts.containerdConfig(s)
	if err := os.WriteFile(ctrdCfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// containerd finds the shim, and the shim runc, in PATH.
	path := "PATH=" + tl.ctrdDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	start := time.Now()
	s.ctrd = startDaemon(t, "containerd", filepath.Join(dir, "containerd.log"), []string{path}, tl.containerd,
		append([]string{"--config", ctrdCfg}, args...)...)
	t.Cleanup(func() {
		if !s.ctrd.Exited() {
			// After a failure, containers may still run on thin devices:
			// remove them so the pool can go.
			if opts.cleanup != nil {
				opts.cleanup(s)
			}
			_ = s.ctrd.Stop(30 * time.Second)
		}
		if t.Failed() {
			tail(t, s.ctrd, 60)
		}
	})
	waitSocket(t, s.ctrd, s.ctrdSock, 2*time.Minute)
	t.Logf("containerd serves %s after %s", s.ctrdSock, time.Since(start).Round(time.Millisecond))
	return s
}

type snapRow struct{ key, parent, kind string }

// listSnapshots parses `ctr snapshots ls`: KEY PARENT KIND, PARENT empty for
// parentless snapshots.
func (s *stack) listSnapshots() []snapRow {
	s.t.Helper()
	out := s.mustCtr(time.Minute, "snapshots", "--snapshotter", "thin", "ls")
	var rows []snapRow
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		switch {
		case i == 0 || len(f) == 0:
			// header
		case len(f) == 3:
			rows = append(rows, snapRow{f[0], f[1], f[2]})
		case len(f) == 2:
			rows = append(rows, snapRow{f[0], "", f[1]})
		default:
			s.t.Fatalf("odd line in ctr snapshots ls: %q", line)
		}
	}
	return rows
}

// check runs `thin-snapshotter check` (daemon stopped): the database and the
// pool must agree.
func (s *stack) check(when string) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.tl.thin, "check", "--config", s.thinCfg).CombinedOutput()
	s.t.Logf("thin-snapshotter check %s:\n%s", when, out)
	if err != nil {
		s.t.Errorf("thin-snapshotter check %s: %v", when, err)
	}
}

// listSnapshotsRetry is listSnapshots right after a thin-snapshotter
// restart: containerd's connection to the proxy plugin may take a moment
// to come back.
func (s *stack) listSnapshotsRetry() []snapRow {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := s.ctr(time.Minute, "snapshots", "--snapshotter", "thin", "ls")
		if err == nil {
			return s.listSnapshots()
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("containerd does not reach thin-snapshotter again: %v", err)
		}
		s.t.Logf("after the restart: %v", err)
		time.Sleep(time.Second)
	}
}

// collectGarbage runs containerd's garbage collector now and waits for it,
// as `ctr leases rm --sync` does: snapshots its clients dropped (ctr run
// --rm) reach our Remove only through it, and it waits up to 49 times its
// last run between runs (pause_threshold 0.02), a minute in the VM.
func (s *stack) collectGarbage() {
	s.t.Helper()
	id := strings.TrimSpace(s.mustCtr(time.Minute, "leases", "create", "--expires", "1m"))
	s.mustCtr(5*time.Minute, "leases", "rm", "--sync", id)
}

// settledDevices is thinDevices once the pool holds want devices besides
// warm ones: thin-snapshotter keeps a committed layer's last device active
// for the layer's next child ("warm", invisible to clients, deleted when
// idle) and its worker may be making one now, so after containerd's
// garbage collection it is asked to drop them (`thin-snapshotter cleanup`)
// until the count settles or a minute passes; the caller checks the count.
func (s *stack) settledDevices(c *dmsetup.Client, want int) []string {
	s.t.Helper()
	s.collectGarbage()
	var ids []string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		// It exits 1 while the worker is removing something: then the
		// next round sees the outcome.
		out, err := exec.CommandContext(ctx, s.tl.thin, "cleanup", "--address", s.thinSock).CombinedOutput()
		cancel()
		ids = thinDevices(s.t, c, s.pool, s.tl.thinLs)
		if len(ids) == want {
			return ids
		}
		if time.Now().After(deadline) {
			s.t.Logf("pool devices %v; last thin-snapshotter cleanup: %v\n%s", ids, err, out)
			return ids
		}
	}
}

// thinDevices lists the thin device ids in the pool's metadata: thin_ls on
// a metadata snapshot (the pool stays live).
func thinDevices(t *testing.T, c *dmsetup.Client, pool, thinLs string) []string {
	t.Helper()
	tbl, err := c.Table(pool)
	if err != nil {
		t.Fatalf("table of %s: %v", pool, err)
	}
	if len(tbl) != 1 || tbl[0].Type != "thin-pool" {
		t.Fatalf("%s: table %v is not one thin-pool target", pool, tbl)
	}
	pp, err := dmsetup.ParsePoolParams(tbl[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	meta, err := blockDevice(pp.MetadataDev)
	if err != nil {
		t.Fatalf("metadata device of %s: %v", pool, err)
	}
	if err := c.ReserveMetadataSnap(pool); err != nil {
		t.Fatalf("reserve_metadata_snap %s: %v", pool, err)
	}
	defer func() {
		if err := c.ReleaseMetadataSnap(pool); err != nil {
			t.Errorf("release_metadata_snap %s: %v", pool, err)
		}
	}()
	out, err := exec.Command(thinLs, "--metadata-snap", "--no-headers", "--format", "DEV", meta).CombinedOutput()
	if err != nil {
		t.Fatalf("thin_ls %s: %v\n%s", meta, err, out)
	}
	ids := strings.Fields(string(out))
	slices.Sort(ids)
	return ids
}

// blockDevice turns major:minor into a /dev path, from sysfs (there is no
// udev in the VM to make /dev/block links).
func blockDevice(majMin string) (string, error) {
	data, err := os.ReadFile(filepath.Join("/sys/dev/block", majMin, "uevent"))
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if name, ok := strings.CutPrefix(line, "DEVNAME="); ok {
			return filepath.Join("/dev", name), nil
		}
	}
	return "", fmt.Errorf("no DEVNAME for block device %s", majMin)
}

func usedDataBlocks(t *testing.T, c *dmsetup.Client, pool string) uint64 {
	t.Helper()
	st, err := c.PoolStatus(pool)
	if err != nil {
		t.Fatalf("status of %s: %v", pool, err)
	}
	return st.UsedDataBlocks
}

// isThinNode reports whether path is the /dev/mapper node of a thin device
// of pool.
func isThinNode(pool, path string) bool {
	dir, name := filepath.Split(path)
	_, ok := dmsetup.ParseDeviceName(pool, name)
	return ok && dir == "/dev/mapper/"
}

// activeThins lists the active dm devices of the pool's snapshots.
func activeThins(t *testing.T, c *dmsetup.Client, pool string) []string {
	t.Helper()
	devs, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		if strings.HasPrefix(d.Name, dmsetup.DeviceNamePrefix(pool)) {
			names = append(names, d.Name)
		}
	}
	return names
}

// snapshotsClient talks to containerd's snapshots service for the thin
// snapshotter, as ctr does, in the test's namespace.
func snapshotsClient(t *testing.T, sock, ns string) (context.Context, snapshots.Snapshotter) {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return namespaces.WithNamespace(context.Background(), ns), proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
}

// withMounted mounts mounts on a fresh directory, runs fn on it and unmounts.
func withMounted(t *testing.T, mounts []mount.Mount, fn func(dir string)) {
	t.Helper()
	dir, err := os.MkdirTemp("", "e2e-mnt-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	if err := mount.All(mounts, dir); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	}()
	fn(dir)
}

func formatRows(rows []snapRow) string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "  %-72s %-72s %s\n", "KEY", "PARENT", "KIND")
	for _, r := range rows {
		fmt.Fprintf(&b, "  %-72s %-72s %s\n", r.key, r.parent, r.kind)
	}
	return b.String()
}

func sameRows(a, b []snapRow) bool {
	key := func(r snapRow) string { return r.key + " " + r.parent + " " + r.kind }
	ka, kb := make([]string, len(a)), make([]string, len(b))
	for i := range a {
		ka[i] = key(a[i])
	}
	for i := range b {
		kb[i] = key(b[i])
	}
	slices.Sort(ka)
	slices.Sort(kb)
	return slices.Equal(ka, kb)
}
