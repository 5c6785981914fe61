package soak

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// daemon is one thin-snapshotter process run from the prebuilt binary, and
// a containerd proxy client to it.
type daemon struct {
	bin, root, sock, config, logPath string

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	conn    *grpc.ClientConn
	sn      snapshots.Snapshotter
	starts  int
}

// newDaemon writes a small-pool configuration under dir; the daemon's state
// lives in dir/root, its socket in dir/thin.sock, its log (every start
// appended) in dir/daemon.log.
func newDaemon(bin, dir, cfgText string) (*daemon, error) {
	d := &daemon{
		bin:     bin,
		root:    filepath.Join(dir, "root"),
		sock:    filepath.Join(dir, "thin.sock"),
		config:  filepath.Join(dir, "config.toml"),
		logPath: filepath.Join(dir, "daemon.log"),
	}
	if err := os.WriteFile(d.config, []byte(cfgText), 0o600); err != nil {
		return nil, err
	}
	return d, nil
}

const smallConfig = `[pool]
data_size = '2GiB'
metadata_size = '64MiB'
[snapshot]
base_size = '128MiB'
`

// start runs the daemon and waits until it answers on its socket: a Stat of
// a key that does not exist must come back NotFound.
func (d *daemon) start(ctx context.Context, timeout time.Duration) error {
	if d.cmd != nil {
		return errors.New("daemon already running")
	}
	logf, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	d.starts++
	fmt.Fprintf(logf, "\n===== soak: start #%d at %s\n", d.starts, time.Now().UTC().Format(time.RFC3339Nano))
	cmd := exec.Command(d.bin, "--root", d.root, "--address", d.sock, "--config", d.config, "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	d.cmd = cmd
	d.exited = make(chan struct{})
	go func() {
		d.waitErr = cmd.Wait()
		logf.Close()
		close(d.exited)
	}()

	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-d.exited:
			d.cmd = nil
			return fmt.Errorf("daemon exited during startup (%w); log tail:\n%s", d.waitErr, d.logTail(4096))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon not serving after %s; log tail:\n%s", timeout, d.logTail(4096))
		}
		if _, err := os.Stat(d.sock); err == nil && d.probe(ctx) == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probe connects (once) and checks the daemon answers.
func (d *daemon) probe(ctx context.Context) error {
	if d.conn == nil {
		conn, err := grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		d.conn = conn
		d.sn = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := d.sn.Stat(pctx, "soak-probe-does-not-exist")
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err == nil {
		return errors.New("probe key exists")
	}
	return err
}

func (d *daemon) closeConn() {
	if d.conn != nil {
		d.conn.Close()
		d.conn, d.sn = nil, nil
	}
}

// kill sends SIGKILL and reaps the process.
func (d *daemon) kill() error {
	if d.cmd == nil {
		return errors.New("daemon not running")
	}
	err := d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	d.cmd = nil
	d.closeConn()
	if err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	return nil
}

// stop asks for a graceful shutdown (SIGTERM); the daemon must exit 0.
func (d *daemon) stop(timeout time.Duration) error {
	if d.cmd == nil {
		return nil
	}
	d.closeConn()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-d.exited:
	case <-time.After(timeout):
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.exited
		d.cmd = nil
		return fmt.Errorf("daemon did not stop within %s after SIGTERM (killed); log tail:\n%s", timeout, d.logTail(4096))
	}
	d.cmd = nil
	if d.waitErr != nil {
		return fmt.Errorf("daemon exited with %w after SIGTERM; log tail:\n%s", d.waitErr, d.logTail(4096))
	}
	return nil
}

// alive reports whether the process still runs (it may have died on its own).
func (d *daemon) alive() bool {
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

func (d *daemon) logTail(n int64) string {
	f, err := os.Open(d.logPath)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(-n, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// linesOfLastStart returns the log lines of the latest start that contain
// substr.
func (d *daemon) linesOfLastStart(substr string) []string {
	b, err := os.ReadFile(d.logPath)
	if err != nil {
		return nil
	}
	marker := fmt.Sprintf("===== soak: start #%d ", d.starts)
	if i := bytes.LastIndex(b, []byte(marker)); i >= 0 {
		b = b[i:]
	}
	var out []string
	for l := range strings.SplitSeq(string(b), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// runCLI runs the daemon binary with args (a subcommand) and returns its
// combined output and exit code.
func runCLI(ctx context.Context, bin string, args ...string) ([]byte, int, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if ee, ok := errors.AsType[*exec.ExitError](err); ok {
		return out.Bytes(), ee.ExitCode(), nil
	}
	if err != nil {
		return out.Bytes(), -1, err
	}
	return out.Bytes(), 0, nil
}
