package contrib

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

// The contrib/pool scripts make a pool the daemon serves, on the real
// kernel: the loopback one for trials and an LVM thin pool on the VM's
// scratch disk (THIN_TEST_DISK), with what a node admin does to the
// latter afterwards (lvextend, VG deactivate/activate, an LVM thin volume).

const poolScripts = "../../contrib/pool"

// daemonBin is the prebuilt daemon: $THIN_SNAPSHOTTER_BIN, else the
// repository's bin/thin-snapshotter (make test-integration builds it).
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
		t.Fatalf("daemon binary %s missing (go build -o bin/thin-snapshotter ./cmd/thin-snapshotter, or set THIN_SNAPSHOTTER_BIN): %v", abs, err)
	}
	return abs
}

// run runs a command with env added, logs its output and returns its
// stdout.
func run(t *testing.T, env []string, name string, args ...string) (string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("$ %s %s (%v)\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	if err != nil {
		err = fmt.Errorf("%s: %w: %s", name, err, stderr.String())
	}
	return stdout.String(), err
}

func mustRun(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	out, err := run(t, env, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// poolLines checks a script's output is exactly a [pool] table with key
// and returns it.
func poolLines(t *testing.T, out, key, value string) string {
	t.Helper()
	if want := fmt.Sprintf("[pool]\n%s = %q\n", key, value); out != want {
		t.Fatalf("script printed %q, want %q", out, want)
	}
	return out
}

// daemon is one thin-snapshotter process on a root and a configuration.
type daemon struct {
	t      *testing.T
	bin    string
	root   string
	sock   string
	config string
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	conn   *grpc.ClientConn
	sn     snapshots.Snapshotter
}

func newDaemon(t *testing.T, poolTOML string) *daemon {
	t.Helper()
	dir := t.TempDir()
	d := &daemon{t: t, bin: daemonBin(t), root: filepath.Join(dir, "root"), sock: filepath.Join(dir, "thin.sock"),
		config: filepath.Join(dir, "config.toml"), log: filepath.Join(dir, "daemon.log")}
	cfg := poolTOML + "\n[snapshot]\nbase_size = '64MiB'\n"
	if err := os.WriteFile(d.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// After the stop: the daemon leaves its image filesystem mirror
	// mounted under its root.
	t.Cleanup(func() {
		if err := imagefs.Remove(d.root); err != nil {
			t.Error(err)
		}
	})
	t.Cleanup(d.stop)
	return d
}

func (d *daemon) logTail() string {
	b, _ := os.ReadFile(d.log)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// start runs the daemon and waits until it answers.
func (d *daemon) start(ctx context.Context) {
	d.t.Helper()
	if err := d.tryStart(ctx); err != nil {
		d.t.Fatal(err)
	}
}

// tryStart runs the daemon and waits until it answers (Stat of a missing
// key comes back NotFound) or exits.
func (d *daemon) tryStart(ctx context.Context) error {
	logf, err := os.OpenFile(d.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	d.cmd = exec.Command(d.bin, "--config", d.config, "--root", d.root, "--address", d.sock, "--log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		return err
	}
	cmd, exited := d.cmd, make(chan struct{})
	d.exited = exited
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	conn, err := grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	d.conn = conn
	d.sn = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
	deadline := time.Now().Add(3 * time.Minute)
	for {
		select {
		case <-exited:
			d.cmd = nil
			return fmt.Errorf("daemon exited during startup (%w):\n%s", waitErr, d.logTail())
		default:
		}
		if _, err := os.Stat(d.sock); err == nil {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err = d.sn.Stat(pctx, "probe-does-not-exist")
			cancel()
			if errdefs.IsNotFound(err) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon not serving:\n%s", d.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the daemon to exit.
func (d *daemon) stop() {
	if d.conn != nil {
		d.conn.Close()
		d.conn, d.sn = nil, nil
	}
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(2 * time.Minute):
		_ = d.cmd.Process.Kill()
		<-d.exited
		d.t.Errorf("daemon did not stop on SIGTERM:\n%s", d.logTail())
	}
	d.cmd = nil
}

// check runs `thin-snapshotter check` (the daemon stopped) and fails on
// findings.
func (d *daemon) check() {
	d.t.Helper()
	mustRun(d.t, nil, d.bin, "--config", d.config, "--root", d.root, "check")
}

// writeAndCommit prepares key, writes a file holding key into its
// filesystem, commits it as key+"-c", and returns the device the snapshot
// had.
func writeAndCommit(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key, wantPrefix string) string {
	t.Helper()
	ms, err := sn.Prepare(ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ms[0].Source, "/dev/mapper/"+wantPrefix) {
		t.Fatalf("snapshot on %s, want a device named %s*", ms[0].Source, wantPrefix)
	}
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatal(err)
	}
	werr := os.WriteFile(filepath.Join(dir, "key"), []byte(key), 0o644)
	if err := mount.UnmountAll(dir, 0); err != nil {
		t.Fatal(err)
	}
	if werr != nil {
		t.Fatal(werr)
	}
	if err := sn.Commit(ctx, key+"-c", key); err != nil {
		t.Fatal(err)
	}
	return ms[0].Source
}

// readBack views committed snapshot name and checks the file
// writeAndCommit left.
func readBack(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key string) {
	t.Helper()
	ms, err := sn.View(ctx, key+"-view", key+"-c")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatal(err)
	}
	b, rerr := os.ReadFile(filepath.Join(dir, "key"))
	if err := mount.UnmountAll(dir, 0); err != nil {
		t.Fatal(err)
	}
	if rerr != nil || string(b) != key {
		t.Fatalf("read back %q, %v; want %q", b, rerr, key)
	}
	if err := sn.Remove(ctx, key+"-view"); err != nil {
		t.Fatal(err)
	}
}

func TestLoopPoolScript(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	dir := t.TempDir()
	name := fmt.Sprintf("thin-contrib-%d", os.Getpid())
	script := filepath.Join(poolScripts, "make-loop-pool")
	args := []string{"--name", name, "--data-size", "1G", "--metadata-size", "64M", dir}
	out := mustRun(t, nil, script, args...)
	t.Cleanup(func() {
		_ = dmtest.RemoveDevices(context.Background(), name)
		for _, f := range []string{"data", "metadata"} {
			if devs, err := run(t, nil, "losetup", "-j", filepath.Join(dir, f), "-O", "NAME", "-n"); err == nil {
				for dev := range strings.FieldsSeq(devs) {
					_, _ = run(t, nil, "losetup", "-d", dev)
				}
			}
		}
	})
	d := newDaemon(t, poolLines(t, out, "name", name))
	d.start(ctx)
	writeAndCommit(ctx, t, d.sn, "loop", name+"-snap-")
	readBack(ctx, t, d.sn, "loop")
	d.stop()
	d.check()

	// Run again (as after a reboot, or by mistake): the same pool, the
	// same line.
	poolLines(t, mustRun(t, nil, script, args...), "name", name)
	d.start(ctx)
	readBack(ctx, t, d.sn, "loop")
}

// lvmEnv points LVM at a configuration for a machine without udev and
// with a read-only /etc (the VM bench): LVM makes its device nodes itself,
// nothing monitors, nothing is backed up.
func lvmEnv(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	conf := `activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
`
	if err := os.WriteFile(filepath.Join(dir, "lvm.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"LVM_SYSTEM_DIR=" + dir, "DM_DISABLE_UDEV=1", "LVM_SUPPRESS_FD_WARNINGS=1"}
}

// requireLVM returns the scratch disk; like dmtest.Require it skips where
// LVM cannot run and fails in the VM bench.
func requireLVM(t *testing.T) string {
	t.Helper()
	dmtest.Require(t)
	disk := os.Getenv("THIN_TEST_DISK")
	_, err := exec.LookPath("lvcreate")
	why := ""
	switch {
	case disk == "":
		why = "THIN_TEST_DISK (a scratch disk LVM may take) is not set"
	case err != nil:
		why = "lvm2 is not installed: " + err.Error()
	}
	if why != "" {
		if os.Getenv(dmtest.RequireEnv) == "1" && os.Getenv("THIN_VM") == "1" {
			t.Fatal(why)
		}
		t.Skip(why)
	}
	// Earlier tests in the same VM use the disk too: clear its head so
	// LVM finds no old signature to ask about.
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Write(make([]byte, 1<<20))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	return disk
}

func poolStatus(t *testing.T, name string) dmsetup.PoolStatus {
	t.Helper()
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.PoolStatus(name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// mirrorFollows waits, 10 s at most, until statfs of the daemon's image
// filesystem mirror (what the kubelet reads) reports the pool's data size.
func mirrorFollows(t *testing.T, d *daemon, pool string) {
	t.Helper()
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	params, _, err := c.PoolTarget(pool)
	if err != nil {
		t.Fatal(err)
	}
	want := poolStatus(t, pool).TotalDataBlocks * dmsetup.Sectors(params.BlockSizeSectors).Bytes()
	start := time.Now()
	for {
		st, err := imagefs.StatDir(imagefs.Dir(d.root))
		if err == nil && st.Capacity == want {
			t.Logf("the image filesystem mirror is %d bytes, the pool's size, after %s", want, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("the image filesystem mirror: %+v, %v; want %d bytes, the pool's size", st, err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestLVMPoolScript(t *testing.T) {
	disk := requireLVM(t)
	ctx := context.Background()
	env := lvmEnv(t)
	const vg, lv = "thin-vg", "pool"
	// LVM doubles the '-' inside names.
	const dmName = "thin--vg-pool"
	out := mustRun(t, env, filepath.Join(poolScripts, "make-lvm-pool"), "--vg", vg, "--lv", lv,
		"--size", "600M", "--threshold", "75", "--percent", "25", disk)
	t.Cleanup(func() { _, _ = run(t, env, "vgchange", "-an", vg) })
	// After the daemon stopped (cleanups run last first).
	t.Cleanup(func() { _ = dmtest.RemoveDevices(context.Background(), dmName+"-snap-") })

	// The autoextend settings are the pool's, through its profile.
	prof := strings.TrimSpace(mustRun(t, env, "lvs", "--noheadings", "-o", "lv_profile", vg+"/"+lv))
	if prof != "thin-snapshotter-autoextend" {
		t.Errorf("pool profile %q", prof)
	}
	eff := mustRun(t, env, "lvmconfig", "--type", "full", "--metadataprofile", prof,
		"activation/thin_pool_autoextend_threshold", "activation/thin_pool_autoextend_percent")
	if !strings.Contains(eff, "thin_pool_autoextend_threshold=75") || !strings.Contains(eff, "thin_pool_autoextend_percent=25") {
		t.Errorf("autoextend settings through the profile: %q", eff)
	}

	d := newDaemon(t, poolLines(t, out, "lvm", vg+"/"+lv))
	d.start(ctx)
	src := writeAndCommit(ctx, t, d.sn, "one", dmName+"-snap-")
	// An active snapshot stays open across what follows.
	if _, err := d.sn.Prepare(ctx, "active", "one-c"); err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot one was on %s", src)

	// LVM refuses thin volumes in the pool now that the daemon advanced
	// its transaction id; the pool keeps its dm name.
	tx := poolStatus(t, dmName).TransactionID
	_, err := run(t, env, "lvcreate", "-V", "64M", "-T", vg+"/"+lv, "-n", "lvmthin")
	if err == nil || !strings.Contains(err.Error(), "Cannot use thin pool") {
		t.Errorf("lvcreate of an LVM thin volume in the daemon's pool (transaction id %d): %v", tx, err)
	}

	// lvextend while the daemon serves: more data blocks, and it goes on;
	// what the kubelet reads of the image filesystem grows with it.
	mirrorFollows(t, d, dmName)
	before := poolStatus(t, dmName).TotalDataBlocks
	mustRun(t, env, "lvextend", "-L", "+200M", vg+"/"+lv)
	if after := poolStatus(t, dmName).TotalDataBlocks; after <= before {
		t.Errorf("data blocks %d after lvextend, %d before", after, before)
	}
	mirrorFollows(t, d, dmName)
	writeAndCommit(ctx, t, d.sn, "two", dmName+"-snap-")
	d.stop()
	d.check()

	// A reboot: the daemon's devices go, then the VG goes down and comes
	// back; the daemon brings its devices back.
	if err := dmtest.RemoveDevices(ctx, dmName+"-snap-"); err != nil {
		t.Fatal(err)
	}
	mustRun(t, env, "vgchange", "-an", vg)
	mustRun(t, env, "vgchange", "-ay", vg)
	d.start(ctx)
	readBack(ctx, t, d.sn, "one")
	readBack(ctx, t, d.sn, "two")
	if ms, err := d.sn.Mounts(ctx, "active"); err != nil || !strings.HasPrefix(ms[0].Source, "/dev/mapper/"+dmName+"-snap-") {
		t.Fatalf("active snapshot after the reboot: %v, %v", ms, err)
	}
	d.stop()

	// LVM's layout once a pool has thin volumes, made by hand (LVM itself
	// refuses to add one now): the thin-pool target is <vg>-<lv>-tpool
	// and <vg>-<lv> a linear wrapper over it. The daemon finds the pool
	// under its other name, still owns it, and its devices keep their
	// names.
	if err := dmtest.RemoveDevices(ctx, dmName+"-snap-"); err != nil {
		t.Fatal(err)
	}
	sectors := mustRun(t, nil, "blockdev", "--getsz", "/dev/mapper/"+dmName)
	mustRun(t, nil, "dmsetup", "rename", dmName, dmName+"-tpool")
	mustRun(t, nil, "dmsetup", "create", dmName, "--table",
		"0 "+strings.TrimSpace(sectors)+" linear /dev/mapper/"+dmName+"-tpool 0")
	t.Cleanup(func() {
		_, _ = run(t, nil, "dmsetup", "remove", dmName)
		_, _ = run(t, nil, "dmsetup", "rename", dmName+"-tpool", dmName)
	})
	d.start(ctx)
	readBack(ctx, t, d.sn, "two")
	if ms, err := d.sn.Mounts(ctx, "active"); err != nil || !strings.HasPrefix(ms[0].Source, "/dev/mapper/"+dmName+"-snap-") {
		t.Fatalf("active snapshot with the pool at %s-tpool: %v, %v", dmName, ms, err)
	}
	writeAndCommit(ctx, t, d.sn, "three", dmName+"-snap-")
	if log := d.logTail(); !regexp.MustCompile(`not dedicated|LVM thin volumes`).MatchString(log) {
		t.Errorf("no warning about the pool's LVM thin volumes in the log:\n%s", log)
	}
	d.stop()
	d.check()
}

// A pool that has LVM thin volumes is not dedicated: LVM keeps its
// thin-pool target at <vg>-<lv>-tpool, where the daemon finds it; a new
// database refuses it, even with allow_adopt, and leaves the pool as it
// was: LVM's volume intact and the transaction id unchanged, so LVM still
// activates the pool. (Had the daemon changed the transaction id, LVM would
// refuse: "Thin pool ... transaction_id is N, while expected M".)
func TestLVMPoolWithLVMThinVolumes(t *testing.T) {
	disk := requireLVM(t)
	ctx := context.Background()
	env := lvmEnv(t)
	const vg, lv, dmName = "thin-vg2", "pool", "thin--vg2-pool"
	out := mustRun(t, env, filepath.Join(poolScripts, "make-lvm-pool"), "--vg", vg, "--lv", lv, "--size", "400M", disk)
	t.Cleanup(func() { _, _ = run(t, env, "vgchange", "-an", vg) })
	mustRun(t, env, "lvcreate", "-V", "64M", "-T", vg+"/"+lv, "-n", "lvmthin")

	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := c.FindThinPool(dmsetup.LVMThinPoolNames(vg, lv)...); err != nil || got != dmName+"-tpool" {
		t.Fatalf("thin-pool device %q, %v; want %s-tpool", got, err, dmName)
	}
	tx := poolStatus(t, dmName+"-tpool").TransactionID

	d := newDaemon(t, poolLines(t, out, "lvm", vg+"/"+lv)+"allow_adopt = true\n")
	err = d.tryStart(ctx)
	if err == nil || !strings.Contains(err.Error(), "has LVM thin volumes") {
		t.Fatalf("daemon on a pool with an LVM thin volume: %v", err)
	}
	if !strings.Contains(err.Error(), "not dedicated") {
		t.Errorf("the refusal does not say the pool is not dedicated:\n%v", err)
	}
	if now := poolStatus(t, dmName+"-tpool").TransactionID; now != tx {
		t.Errorf("transaction id %d after the failed start, %d before", now, tx)
	}
	if !strings.Contains(mustRun(t, env, "lvs", "--noheadings", "-o", "lv_name", vg), "lvmthin") {
		t.Error("LVM's thin volume is gone")
	}
	mustRun(t, env, "vgchange", "-an", vg)
	mustRun(t, env, "vgchange", "-ay", vg)
	// LVM's volume is back and readable.
	f, err := os.Open("/dev/mapper/" + dmsetup.LVMDeviceName(vg, "lvmthin"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Read(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
}
