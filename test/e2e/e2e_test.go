// Package e2e runs the whole stack on a real dm-thin kernel: thin-snapshotter
// and containerd 2.4.2 as processes, an image imported with
// `ctr images import --snapshotter thin`, containers run with
// `ctr run --snapshotter thin`, and the pool checked empty afterwards.
//
// Run it with `make test-e2e` (in the VM bench). It needs the
// thin-snapshotter binary (THIN_E2E_SNAPSHOTTER, default bin/thin-snapshotter
// of the repository), containerd, ctr and containerd-shim-runc-v2
// (THIN_E2E_CONTAINERD_DIR, default .bench/containerd-v2.4.2), runc, a static
// busybox (THIN_E2E_BUSYBOX, default /bin/busybox) and thin_ls.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

const (
	imageRef  = "docker.io/thin-snapshotter/e2e:latest"
	namespace = "default"
	bigSize   = 64 << 20
	bigSeed   = 0x7468696e
	// many/dNN/fNNNN: manyDirs directories of manyPerDir files each.
	manyDirs   = 30
	manyPerDir = 100
)

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

// daemon is a started background process with its output in a log file.
type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startDaemon(t *testing.T, name, logPath string, env []string, bin string, args ...string) *daemon {
	t.Helper()
	// The VM bench copies $THIN_VM_OUT to the host (test/vm/run --out).
	if out := os.Getenv("THIN_VM_OUT"); out != "" {
		t.Cleanup(func() {
			if data, err := os.ReadFile(logPath); err == nil {
				_ = os.WriteFile(filepath.Join(out, filepath.Base(logPath)), data, 0o644)
			}
		})
	}
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		lf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		lf.Close()
		close(d.done)
	}()
	return d
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits; after timeout it kills the process.
func (d *daemon) stop(timeout time.Duration) error {
	if d.exited() {
		return fmt.Errorf("%s had already exited: %w", d.name, d.err)
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("%s did not stop within %s after SIGTERM; killed", d.name, timeout)
	}
}

// tail logs the last lines of the daemon's log.
func (d *daemon) tail(t *testing.T, lines int) {
	data, err := os.ReadFile(d.log)
	if err != nil {
		t.Logf("%s log: %v", d.name, err)
		return
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	t.Logf("last %d lines of the %s log:\n%s", len(all), d.name, strings.Join(all, "\n"))
}

func waitSocket(t *testing.T, d *daemon, sock string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if d.exited() {
			d.tail(t, 40)
			t.Fatalf("%s exited before serving %s: %v", d.name, sock, d.err)
		}
		if time.Now().After(deadline) {
			d.tail(t, 40)
			t.Fatalf("%s does not serve %s after %s: %v", d.name, sock, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitReady waits for READY=1 from d on the notify socket.
func waitReady(t *testing.T, d *daemon, notify *net.UnixConn, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 4096)
	for {
		if err := notify.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		n, err := notify.Read(buf)
		if err == nil && slices.Contains(strings.Split(string(buf[:n]), "\n"), "READY=1") {
			return
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("notify socket: %v", err)
		}
		if d.exited() {
			d.tail(t, 40)
			t.Fatalf("%s exited before READY=1: %v", d.name, d.err)
		}
		if time.Now().After(deadline) {
			d.tail(t, 40)
			t.Fatalf("%s sent no READY=1 within %s", d.name, timeout)
		}
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
	pool       string
	poolGone   bool
	thinCfg    string
	thinSock   string
	ctrdSock   string
	thin, ctrd *daemon
}

func (s *stack) ctr(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := append([]string{"--address", s.ctrdSock, "--namespace", namespace}, args...)
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
		s.thin.tail(s.t, 30)
		s.ctrd.tail(s.t, 30)
		s.t.Fatal(err)
	}
	return out
}

const thinConfig = `root = %q
address = %q
log_level = 'debug'

[pool]
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

func startStack(t *testing.T, tl tools) *stack {
	dir := t.TempDir()
	s := &stack{
		t:        t,
		tl:       tl,
		dir:      dir,
		thinSock: filepath.Join(dir, "thin.sock"),
		ctrdSock: filepath.Join(dir, "containerd.sock"),
	}
	thinRoot := filepath.Join(dir, "thin")
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
	if err := os.WriteFile(thinCfg, fmt.Appendf(nil, thinConfig, thinRoot, s.thinSock), 0o644); err != nil {
		t.Fatal(err)
	}
	s.thinCfg = thinCfg
	t.Cleanup(func() {
		if s.thin == nil {
			return
		}
		if !s.thin.exited() {
			_ = s.thin.stop(30 * time.Second)
		}
		if t.Failed() {
			s.thin.tail(t, 60)
		}
	})
	s.startThin("thin.log")

	ctrdCfg := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(ctrdCfg, fmt.Appendf(nil, containerdConfig,
		filepath.Join(dir, "containerd", "root"), filepath.Join(dir, "containerd", "state"),
		s.ctrdSock, s.thinSock), 0o644); err != nil {
		t.Fatal(err)
	}
	// containerd finds the shim, and the shim runc, in PATH.
	path := "PATH=" + tl.ctrdDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	start := time.Now()
	s.ctrd = startDaemon(t, "containerd", filepath.Join(dir, "containerd.log"), []string{path}, tl.containerd, "--config", ctrdCfg)
	t.Cleanup(func() {
		if !s.ctrd.exited() {
			// After a failure, containers may still run on thin devices:
			// remove them so the pool can go.
			for _, id := range []string{"e2e-check", "e2e-sleeper", "e2e-persist", "e2e-par-0", "e2e-par-1", "e2e-par-2", "e2e-par-3"} {
				_, _ = s.ctr(time.Minute, "tasks", "rm", "--force", id)
				_, _ = s.ctr(time.Minute, "containers", "rm", id)
			}
			_ = s.ctrd.stop(30 * time.Second)
		}
		if t.Failed() {
			s.ctrd.tail(t, 60)
		}
	})
	waitSocket(t, s.ctrd, s.ctrdSock, 2*time.Minute)
	t.Logf("containerd serves %s after %s", s.ctrdSock, time.Since(start).Round(time.Millisecond))
	return s
}

// e2eImage is the test image; expect is what a container of it must print
// for the checks in containerScript.
func e2eImage(t *testing.T, busybox string) (imagegen.Image, map[string]string) {
	bb, err := imagegen.Busybox(busybox)
	if err != nil {
		t.Fatal(err)
	}
	// Layer 1: a userland, thousands of small files, and what later layers
	// delete, hide or overwrite.
	l1 := append([]imagegen.Entry(nil), bb...)
	l1 = append(l1, imagegen.Dir("many", 0o755))
	for d := range manyDirs {
		dir := fmt.Sprintf("many/d%02d", d)
		l1 = append(l1, imagegen.Dir(dir, 0o755))
		for f := range manyPerDir {
			n := d*manyPerDir + f
			l1 = append(l1, imagegen.File(fmt.Sprintf("%s/f%04d", dir, n), 0o644, fmt.Sprintf("file %d\n", n)))
		}
	}
	l1 = append(l1,
		imagegen.Dir("data", 0o755),
		imagegen.File("data/deleted", 0o644, "deleted in layer 3\n"),
		imagegen.File("data/keep", 0o644, "old\n"),
		imagegen.Dir("opq", 0o755),
		imagegen.File("opq/old1", 0o644, "old1\n"),
		imagegen.File("opq/old2", 0o644, "old2\n"),
		imagegen.Dir("opq/sub", 0o755),
		imagegen.File("opq/sub/old3", 0o644, "old3\n"),
		imagegen.Dir("wh", 0o755),
		imagegen.Dir("wh/gone", 0o755),
		imagegen.File("wh/gone/a", 0o644, "a\n"),
		imagegen.File("wh/gone/b", 0o644, "b\n"),
		imagegen.File("wh/stay", 0o644, "stay\n"),
	)

	// Layer 2: one large file, uncompressed.
	l2 := []imagegen.Entry{
		imagegen.Dir("big", 0o755),
		{Path: "big/blob", Type: '0', Mode: 0o644, Size: bigSize, Content: func() io.Reader {
			return imagegen.PseudoRandom(bigSeed, bigSize)
		}},
	}
	h := sha256.New()
	if _, err := io.Copy(h, imagegen.PseudoRandom(bigSeed, bigSize)); err != nil {
		t.Fatal(err)
	}
	// Computed apart from the layer so that a generator bug cannot make
	// image and expectation agree.
	bigSum := hex.EncodeToString(h.Sum(nil))

	// Layer 3: whiteouts, an opaque directory, links, xattrs, ownership.
	l3 := []imagegen.Entry{
		imagegen.Dir("data", 0o755),
		imagegen.Whiteout("data/deleted"),
		imagegen.Dir("wh", 0o755),
		imagegen.Whiteout("wh/gone"),
		imagegen.Dir("opq", 0o755),
		imagegen.Opaque("opq"),
		imagegen.File("opq/new1", 0o644, "new1\n"),
		imagegen.Dir("opq/newdir", 0o755),
		imagegen.File("opq/newdir/x", 0o644, "x\n"),
		imagegen.Dir("links", 0o755),
		imagegen.File("links/a", 0o644, "linked\n"),
		imagegen.Hardlink("links/b", "links/a"),
		imagegen.Symlink("links/sym", "../data/keep"),
		imagegen.Symlink("links/abs", "/data/keep"),
		imagegen.Dir("xattr", 0o755),
		{Path: "xattr/file", Type: '0', Mode: 0o644, Data: []byte("has xattrs\n"),
			Xattrs: map[string]string{"user.thin": "e2e-value", "user.other": "42"}},
		{Path: "perm", Type: '5', Mode: 0o755},
		{Path: "perm/file", Type: '0', Mode: 0o640, UID: 1000, GID: 1000, Data: []byte("secret\n")},
		{Path: "perm/dir", Type: '5', Mode: 0o700, UID: 1000, GID: 1000},
	}

	// Layer 4: an overwritten file, a deleted file, a new file.
	l4 := []imagegen.Entry{
		imagegen.Dir("data", 0o755),
		imagegen.File("data/keep", 0o644, "new\n"),
		imagegen.Dir("many", 0o755),
		imagegen.Dir("many/d00", 0o755),
		imagegen.Whiteout("many/d00/f0000"),
		imagegen.File("etc/motd", 0o644, "hello from a thin device\n"),
	}

	img := imagegen.Image{
		Ref: imageRef,
		Layers: []imagegen.Layer{
			{Entries: l1, Gzip: true, Comment: "userland and small files"},
			{Entries: l2, Comment: "large file"},
			{Entries: l3, Gzip: true, Comment: "whiteouts, opaque directory, links, xattrs"},
			{Entries: l4, Gzip: true, Comment: "overwrite and delete"},
		},
	}
	img.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	img.Config.Cmd = []string{"/bin/sh"}

	last := manyDirs*manyPerDir - 1
	expect := map[string]string{
		"deleted":           "absent",
		"wh_gone":           "absent",
		"wh_stay":           "stay",
		"opq":               "new1 newdir",
		"opq_sub":           "absent",
		"opq_newdir":        "x",
		"many":              fmt.Sprint(manyDirs*manyPerDir - 1),
		"many_dirs":         fmt.Sprint(manyDirs),
		"many_first":        "absent",
		"many_last":         fmt.Sprintf("file %d", last),
		"big":               bigSum,
		"big_size":          fmt.Sprint(bigSize),
		"hardlink":          "same",
		"nlink":             "2",
		"symlink":           "../data/keep",
		"symlink_content":   "new",
		"abslink_content":   "new",
		"keep":              "new",
		"motd":              "hello from a thin device",
		"perm_file":         "640 1000 1000",
		"perm_dir":          "700 1000 1000",
		"whiteouts_visible": "0",
		"lost_found":        "absent",
		"write":             "written by the container",
		"scratch":           fmt.Sprint(16 << 20),
		"scratch_sum":       zeroSum(16 << 20),
		"done":              "1",
	}
	return img, expect
}

func zeroSum(n int) string {
	s := sha256.Sum256(make([]byte, n))
	return hex.EncodeToString(s[:])
}

// containerScript prints key=value lines that e2eImage's expectations
// describe, plus root= (the root mount) checked separately.
const containerScript = `
ex() { if test -e "$1" || test -L "$1"; then echo present; else echo absent; fi; }
echo "deleted=$(ex /data/deleted)"
echo "wh_gone=$(ex /wh/gone)"
echo "wh_stay=$(cat /wh/stay)"
echo "opq=$(echo $(ls -A /opq))"
echo "opq_sub=$(ex /opq/sub)"
echo "opq_newdir=$(cat /opq/newdir/x)"
echo "many=$(find /many -type f | wc -l)"
echo "many_dirs=$(find /many -mindepth 1 -type d | wc -l)"
echo "many_first=$(ex /many/d00/f0000)"
echo "many_last=$(cat /many/d29/f2999)"
echo "big=$(sha256sum /big/blob | cut -d' ' -f1)"
echo "big_size=$(stat -c %s /big/blob)"
if [ "$(stat -c %i /links/a)" = "$(stat -c %i /links/b)" ]; then echo hardlink=same; else echo hardlink=different; fi
echo "nlink=$(stat -c %h /links/a)"
echo "symlink=$(readlink /links/sym)"
echo "symlink_content=$(cat /links/sym)"
echo "abslink_content=$(cat /links/abs)"
echo "keep=$(cat /data/keep)"
echo "motd=$(cat /etc/motd)"
echo "perm_file=$(stat -c '%a %u %g' /perm/file)"
echo "perm_dir=$(stat -c '%a %u %g' /perm/dir)"
echo "whiteouts_visible=$(find / -xdev -name '.wh.*' | wc -l)"
echo "lost_found=$(ex /lost+found)"
echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"
echo "written by the container" > /written
echo "write=$(cat /written)"
dd if=/dev/zero of=/scratch bs=1M count=16 2>/dev/null
sync
echo "scratch=$(stat -c %s /scratch)"
echo "scratch_sum=$(sha256sum /scratch | cut -d' ' -f1)"
echo "df=$(df -k / | tail -n 1)"
echo done=1
`

func parseKV(out string) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
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

// activeThins lists the active dm devices of the pool's snapshots.
// isThinNode reports whether path is the /dev/mapper node of a thin device
// of pool.
func isThinNode(pool, path string) bool {
	dir, name := filepath.Split(path)
	_, ok := dmsetup.ParseDeviceName(pool, name)
	return ok && dir == "/dev/mapper/"
}

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
func snapshotsClient(t *testing.T, sock string) (context.Context, snapshots.Snapshotter) {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return namespaces.WithNamespace(context.Background(), namespace), proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
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

func TestEndToEnd(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	tStart := time.Now()
	s := startStack(t, tl)

	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()

	var snapshotterLines []string
	for l := range strings.SplitSeq(s.mustCtr(time.Minute, "plugins", "ls"), "\n") {
		if strings.HasPrefix(l, "io.containerd.snapshotter.v1 ") {
			snapshotterLines = append(snapshotterLines, l)
		}
	}
	t.Logf("ctr plugins ls (snapshotters):\n%s", strings.Join(snapshotterLines, "\n"))
	if !slices.ContainsFunc(snapshotterLines, func(l string) bool {
		f := strings.Fields(l)
		return len(f) >= 4 && f[1] == "thin" && f[len(f)-1] == "ok"
	}) {
		t.Fatal("containerd does not list the thin snapshotter as ok")
	}
	ids := thinDevices(t, dm, s.pool, tl.thinLs)
	t.Logf("pool %s after start: %d thin device(s) %v", s.pool, len(ids), ids)
	if len(ids) != 1 {
		t.Fatalf("a fresh pool should hold only the base device, holds %v", ids)
	}
	baseID := ids[0]
	usedAtStart := usedDataBlocks(t, dm, s.pool)

	// The image.
	start := time.Now()
	img, expect := e2eImage(t, tl.busybox)
	tarPath := filepath.Join(s.dir, "image.tar")
	f, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	res, err := imagegen.Write(f, s.dir, img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("generated %s: %d layers, %d MiB, manifest %s, in %s", imageRef, len(res.Layers), st.Size()>>20,
		res.Manifest.Digest, time.Since(start).Round(time.Millisecond))

	// The VM is 5-20x slower than a real machine, and by varying amounts:
	// the same import into overlayfs in the same run is the yardstick.
	// Image and content are removed again so both imports start empty.
	start = time.Now()
	s.mustCtr(15*time.Minute, "images", "import", "--snapshotter", "overlayfs", tarPath)
	tOverlay := time.Since(start)
	s.mustCtr(5*time.Minute, "images", "rm", "--sync", imageRef)
	if out := s.mustCtr(time.Minute, "content", "ls", "-q"); strings.TrimSpace(out) != "" {
		t.Fatalf("content left after removing the overlayfs import:\n%s", out)
	}

	start = time.Now()
	out := s.mustCtr(15*time.Minute, "images", "import", "--snapshotter", "thin", tarPath)
	tImport := time.Since(start)
	t.Logf("ctr images import --snapshotter thin: %s (overlayfs in this VM: %s, ratio %.2f)\n%s", tImport.Round(time.Millisecond),
		tOverlay.Round(time.Millisecond), tImport.Seconds()/tOverlay.Seconds(), out)
	out = s.mustCtr(time.Minute, "images", "ls", "-q")
	if !slices.Contains(strings.Fields(out), imageRef) {
		t.Fatalf("ctr images ls does not list %s:\n%s", imageRef, out)
	}

	// Every layer is a committed snapshot keyed by its chain ID, on its
	// parent layer.
	rows := s.listSnapshots()
	t.Logf("ctr snapshots --snapshotter thin ls after import:\n%s", formatRows(rows))
	var want []snapRow
	for i, c := range res.ChainIDs {
		r := snapRow{key: c.String(), kind: "Committed"}
		if i > 0 {
			r.parent = res.ChainIDs[i-1].String()
		}
		want = append(want, r)
	}
	if !sameRows(rows, want) {
		t.Fatalf("snapshots after import:\n%s\nwant:\n%s", formatRows(rows), formatRows(want))
	}
	ids = thinDevices(t, dm, s.pool, tl.thinLs)
	t.Logf("pool after import: %d thin devices %v; active: %v; %d data blocks used (%d after start)",
		len(ids), ids, activeThins(t, dm, s.pool), usedDataBlocks(t, dm, s.pool), usedAtStart)
	if len(ids) != 1+len(res.Layers) {
		t.Errorf("pool holds %d thin devices after import, want base + %d layers", len(ids), len(res.Layers))
	}
	if a := activeThins(t, dm, s.pool); len(a) != 0 {
		t.Errorf("committed layers must not stay active, active: %v", a)
	}

	// containerd asks for usage (CRI does, every 10 s): the large file's
	// layer accounts for at least the file.
	sctx, sn := snapshotsClient(t, s.ctrdSock)
	for i, c := range res.ChainIDs {
		u, err := sn.Usage(sctx, c.String())
		if err != nil {
			t.Errorf("usage of layer %d: %v", i, err)
			continue
		}
		t.Logf("usage of layer %d (%s): %d bytes, %d inodes", i, img.Layers[i].Comment, u.Size, u.Inodes)
		if i == 1 && u.Size < bigSize {
			t.Errorf("usage of the large file's layer: %d bytes, want at least %d", u.Size, bigSize)
		}
	}

	// Mounts of a committed layer is an error, not a half-made mount.
	if m, err := sn.Mounts(sctx, res.ChainIDs[0].String()); err == nil {
		t.Errorf("Mounts of a committed layer returned %+v and no error", m)
	}

	// A restarted thin-snapshotter takes its pool and snapshots back,
	// containerd reconnects, and a running container does not notice.
	top := res.ChainIDs[len(res.ChainIDs)-1].String()
	s.mustCtr(10*time.Minute, "run", "-d", "--snapshotter", "thin", imageRef, "e2e-sleeper", "/bin/sleep", "3600")
	if err := s.thin.stop(time.Minute); err != nil {
		t.Fatalf("stopping thin-snapshotter: %v", err)
	}
	s.check("with the image and a running container")
	s.startThin("thin-restarted.log")
	withSleeper := append(slices.Clone(want), snapRow{key: "e2e-sleeper", parent: top, kind: "Active"})
	if rows := s.listSnapshotsRetry(); !sameRows(rows, withSleeper) {
		t.Fatalf("snapshots after a thin-snapshotter restart:\n%s\nwant:\n%s", formatRows(rows), formatRows(withSleeper))
	}
	out = s.mustCtr(5*time.Minute, "tasks", "exec", "--exec-id", "probe", "e2e-sleeper",
		"/bin/sh", "-c", "echo alive > /alive && sync && cat /alive")
	if strings.TrimSpace(out) != "alive" {
		t.Errorf("the running container after the restart: %q, want alive", out)
	} else {
		t.Logf("container e2e-sleeper ran across the thin-snapshotter restart and still writes to its device")
	}
	s.mustCtr(5*time.Minute, "tasks", "rm", "--force", "e2e-sleeper")
	s.mustCtr(5*time.Minute, "containers", "rm", "e2e-sleeper")
	if rows := s.listSnapshots(); !sameRows(rows, want) {
		t.Fatalf("snapshots after removing the container:\n%s\nwant:\n%s", formatRows(rows), formatRows(want))
	}

	// What tar and the container cannot show: xattrs and ownership, seen
	// through a read-only view of the top layer mounted here.
	mounts, err := sn.View(sctx, "e2e-inspect", res.ChainIDs[len(res.ChainIDs)-1].String(),
		snapshots.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)}))
	if err != nil {
		t.Fatalf("view of the top layer: %v", err)
	}
	t.Logf("view mounts: %+v", mounts)
	if len(mounts) != 1 || !slices.Contains(mounts[0].Options, "ro") {
		t.Errorf("a view should be one read-only mount, got %+v", mounts)
	}
	withMounted(t, mounts, func(dir string) {
		for _, x := range []struct{ name, want string }{{"user.thin", "e2e-value"}, {"user.other", "42"}} {
			buf := make([]byte, 256)
			n, err := unix.Lgetxattr(filepath.Join(dir, "xattr/file"), x.name, buf)
			if err != nil {
				t.Errorf("xattr %s of /xattr/file: %v", x.name, err)
				continue
			}
			if got := string(buf[:n]); got != x.want {
				t.Errorf("xattr %s of /xattr/file = %q, want %q", x.name, got, x.want)
			}
		}
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(dir, "perm/file"), &st); err != nil {
			t.Error(err)
		} else if st.Uid != 1000 || st.Gid != 1000 || st.Mode&0o7777 != 0o640 {
			t.Errorf("/perm/file: uid %d gid %d mode %o, want 1000 1000 640", st.Uid, st.Gid, st.Mode&0o7777)
		}
		if err := os.WriteFile(filepath.Join(dir, "nope"), nil, 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("writing into a view: %v, want EROFS", err)
		}
	})
	if err := sn.Remove(sctx, "e2e-inspect"); err != nil {
		t.Errorf("remove the view: %v", err)
	}

	// A container sees the merged image and can write.
	start = time.Now()
	out = s.mustCtr(10*time.Minute, "run", "--rm", "--snapshotter", "thin", imageRef, "e2e-check", "/bin/sh", "-c", containerScript)
	tRun := time.Since(start)
	t.Logf("ctr run --rm --snapshotter thin (%s), container output:\n%s", tRun.Round(time.Millisecond), out)
	got := parseKV(out)
	for k, v := range expect {
		if got[k] != v {
			t.Errorf("container: %s = %q, want %q", k, got[k], v)
		}
	}
	root := strings.Fields(got["root"])
	if len(root) != 3 || !isThinNode(s.pool, root[0]) || root[1] != "ext4" ||
		!slices.Contains(strings.Split(root[2], ","), "rw") {
		t.Errorf("container root mount %q: want a rw ext4 /dev/mapper/%s", got["root"], dmsetup.DeviceNamePrefix(s.pool)+"<id>")
	}

	// Containers start side by side: their snapshots are prepared in
	// parallel, each on its own device.
	start = time.Now()
	const parallel = 4
	outs := make([]string, parallel)
	errs := make([]error, parallel)
	var wg sync.WaitGroup
	for i := range parallel {
		wg.Go(func() {
			outs[i], errs[i] = s.ctr(10*time.Minute, "run", "--rm", "--snapshotter", "thin", imageRef, fmt.Sprintf("e2e-par-%d", i),
				"/bin/sh", "-c", fmt.Sprintf("echo %d > /mine && sync && cat /mine /data/keep && awk '$2 == \"/\" { print $1 }' /proc/mounts", i))
		})
	}
	wg.Wait()
	devices := map[string]bool{}
	for i := range parallel {
		f := strings.Fields(outs[i])
		if errs[i] != nil || len(f) != 3 || f[0] != fmt.Sprint(i) || f[1] != "new" {
			t.Errorf("parallel container %d: %q, %v", i, outs[i], errs[i])
			continue
		}
		devices[f[2]] = true
	}
	t.Logf("%d containers side by side in %s on devices %v", parallel, time.Since(start).Round(time.Millisecond), slices.Sorted(maps.Keys(devices)))
	if len(devices) != parallel && !t.Failed() {
		t.Errorf("%d parallel containers shared root devices: %v", parallel, devices)
	}

	// A container kept after its task ends keeps its writes on its thin
	// device.
	start = time.Now()
	out = s.mustCtr(10*time.Minute, "run", "--snapshotter", "thin", imageRef, "e2e-persist", "/bin/sh", "-c", "echo persisted > /persist && sync")
	t.Logf("ctr run e2e-persist (%s): %q", time.Since(start).Round(time.Millisecond), out)
	pm, err := sn.Mounts(sctx, "e2e-persist")
	if err != nil {
		t.Fatalf("mounts of the kept container's snapshot: %v", err)
	}
	withMounted(t, pm, func(dir string) {
		data, err := os.ReadFile(filepath.Join(dir, "persist"))
		if err != nil || string(data) != "persisted\n" {
			t.Errorf("/persist of the kept container: %q, %v", data, err)
		}
	})
	ids = thinDevices(t, dm, s.pool, tl.thinLs)
	t.Logf("pool with the kept container: %d thin devices %v; active: %v", len(ids), ids, activeThins(t, dm, s.pool))
	if len(ids) != 2+len(res.Layers) {
		t.Errorf("pool holds %d thin devices with one container, want base + %d layers + 1", len(ids), len(res.Layers))
	}

	// Remove the container and the image: containerd's GC removes the
	// snapshots, and the thin devices go with them.
	start = time.Now()
	s.mustCtr(time.Minute, "containers", "rm", "e2e-persist")
	s.mustCtr(5*time.Minute, "images", "rm", "--sync", imageRef)
	var left []snapRow
	for deadline := time.Now().Add(2 * time.Minute); ; {
		left = s.listSnapshots()
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(left) != 0 {
		t.Fatalf("snapshots left 2 min after removing the image and the container:\n%s", formatRows(left))
	}
	// The metadata goes first; the snapshotter's Remove follows.
	for deadline := time.Now().Add(2 * time.Minute); ; {
		ids = thinDevices(t, dm, s.pool, tl.thinLs)
		if len(ids) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	tGC := time.Since(start)
	t.Logf("after removing the image and the container (%s): ctr snapshots ls is empty; pool holds %d thin device(s) %v",
		tGC.Round(time.Millisecond), len(ids), ids)
	if len(ids) != 1 || ids[0] != baseID {
		t.Errorf("pool holds %v after GC, want only the base device %s", ids, baseID)
	}
	if a := activeThins(t, dm, s.pool); len(a) != 0 {
		t.Errorf("active thin devices after GC: %v", a)
	}
	// Deleted thin devices give their blocks back to the pool.
	if used := usedDataBlocks(t, dm, s.pool); used != usedAtStart {
		t.Errorf("pool uses %d data blocks after GC, %d after start", used, usedAtStart)
	} else {
		t.Logf("pool uses %d data blocks after GC, as after start", used)
	}

	// Stop both daemons: thin-snapshotter exits cleanly and leaves only
	// the pool.
	if err := s.ctrd.stop(time.Minute); err != nil {
		t.Errorf("containerd: %v", err)
	}
	if err := s.thin.stop(time.Minute); err != nil {
		t.Errorf("thin-snapshotter did not exit cleanly: %v", err)
	}
	s.check("after GC and shutdown")
	devs, err := dm.List()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	t.Logf("dm devices after both daemons stopped: %v", names)
	if len(names) != 1 || names[0] != s.pool {
		t.Errorf("dm devices after stop: %v, want only the pool %s", names, s.pool)
	}
	if err := dmtest.DestroyLoopPool(context.Background(), s.pool, filepath.Join(s.dir, "thin", "pool")); err != nil {
		t.Fatalf("destroy the pool: %v", err)
	}
	s.poolGone = true
	devs, err = dm.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.Name, s.pool) {
			t.Errorf("dm device %s left after the pool was torn down", d.Name)
		}
	}
	t.Logf("timings: import %s (overlayfs %s), run %s, removal+GC %s, total %s",
		tImport.Round(time.Millisecond), tOverlay.Round(time.Millisecond), tRun.Round(time.Millisecond), tGC.Round(time.Millisecond), time.Since(tStart).Round(time.Millisecond))
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
