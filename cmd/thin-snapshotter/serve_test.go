package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// shortTempDir keeps socket paths well under the 107-byte limit, which
// t.TempDir's long names can exceed.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ts")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// testSnapshotter wraps containerd's native snapshotter (a test double
// only) and records what the daemon does with it.
type testSnapshotter struct {
	snapshots.Snapshotter

	mu       sync.Mutex
	events   []string
	closeErr error
	// prepareHook, when set, runs at the start of every Prepare; its error
	// fails the call.
	prepareHook func(ctx context.Context) error
}

func (s *testSnapshotter) record(e string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, e)
}

func (s *testSnapshotter) Events() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.events...)
}

func (s *testSnapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if s.prepareHook != nil {
		if err := s.prepareHook(ctx); err != nil {
			s.record("prepare " + key + " failed")
			return nil, err
		}
	}
	m, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	s.record("prepare " + key)
	return m, err
}

func (s *testSnapshotter) Close() error {
	s.record("close")
	if err := s.Snapshotter.Close(); err != nil {
		return err
	}
	return s.closeErr
}

func newTestSnapshotter(t *testing.T) *testSnapshotter {
	t.Helper()
	sn, err := native.NewSnapshotter(filepath.Join(shortTempDir(t), "native"))
	if err != nil {
		t.Fatal(err)
	}
	return &testSnapshotter{Snapshotter: sn}
}

func testConfig(t *testing.T) *config.Config {
	dir := shortTempDir(t)
	cfg := config.Default()
	cfg.Root = filepath.Join(dir, "root")
	cfg.Address = filepath.Join(dir, "run", "thin.sock")
	cfg.LogLevel = "debug"
	return cfg
}

// runningDaemon is serve running in a goroutine.
type runningDaemon struct {
	cfg    *config.Config
	cancel context.CancelFunc
	done   chan error
	notes  chan string
	opened chan struct{} // closed when the factory is called
}

func startServe(t *testing.T, cfg *config.Config, sn snapshots.Snapshotter, factoryErr error, timeout time.Duration) *runningDaemon {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &runningDaemon{cfg: cfg, cancel: cancel, done: make(chan error, 1), notes: make(chan string, 10), opened: make(chan struct{})}
	opts := serveOptions{
		notify:          func(s string) error { d.notes <- s; return nil },
		shutdownTimeout: timeout,
	}
	factory := func(ctx context.Context, c *config.Config) (snapshots.Snapshotter, error) {
		close(d.opened)
		if c != cfg {
			return nil, errors.New("factory got a different config")
		}
		if factoryErr != nil {
			return nil, factoryErr
		}
		return sn, nil
	}
	go func() { d.done <- serve(ctx, cfg, factory, opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
			t.Error("serve did not return")
		}
	})
	return d
}

// waitReady waits for READY=1 and fails if serve returns first.
func (d *runningDaemon) waitReady(t *testing.T) {
	t.Helper()
	select {
	case n := <-d.notes:
		if n != daemon.SdNotifyReady {
			t.Fatalf("first notification %q, want %q", n, daemon.SdNotifyReady)
		}
	case err := <-d.done:
		t.Fatalf("serve returned before READY: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no READY notification")
	}
}

// stop cancels the daemon and returns serve's result.
func (d *runningDaemon) stop(t *testing.T) error {
	t.Helper()
	d.cancel()
	select {
	case err := <-d.done:
		d.done <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return after cancel")
		return nil
	}
}

func dialSnapshotter(t *testing.T, address string) snapshots.Snapshotter {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestServeRoundTrip(t *testing.T) {
	cfg := testConfig(t)
	sn := newTestSnapshotter(t)
	d := startServe(t, cfg, sn, nil, 5*time.Second)
	d.waitReady(t)

	if m := mode(t, cfg.Root); m != 0o700 {
		t.Errorf("root mode %o, want 700", m)
	}
	if m := mode(t, filepath.Dir(cfg.Address)); m != 0o700 {
		t.Errorf("socket directory mode %o, want 700", m)
	}
	if m := mode(t, cfg.Address); m != 0o660 {
		t.Errorf("socket mode %o, want 660", m)
	}

	ctx := context.Background()
	client := dialSnapshotter(t, cfg.Address)
	mounts, err := client.Prepare(ctx, "active", "")
	if err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	if len(mounts) != 1 || mounts[0].Type != "bind" {
		t.Fatalf("Prepare mounts = %+v", mounts)
	}
	if err := client.Commit(ctx, "committed", "active", snapshots.WithLabels(map[string]string{"l": "v"})); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	info, err := client.Stat(ctx, "committed")
	if err != nil {
		t.Fatalf("Stat: %v", err)
	}
	if info.Name != "committed" || info.Kind != snapshots.KindCommitted || info.Labels["l"] != "v" {
		t.Fatalf("Stat = %+v", info)
	}
	if _, err := client.Stat(ctx, "active"); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat of the committed active key: %v, want NotFound", err)
	}
	var walked []string
	if err := client.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		walked = append(walked, i.Name)
		return nil
	}); err != nil || len(walked) != 1 || walked[0] != "committed" {
		t.Fatalf("Walk = %v, %v", walked, err)
	}

	if err := d.stop(t); err != nil {
		t.Fatalf("serve: %v", err)
	}
	if n := <-d.notes; n != daemon.SdNotifyStopping {
		t.Errorf("notification after stop %q, want %q", n, daemon.SdNotifyStopping)
	}
	if ev := sn.Events(); len(ev) != 2 || ev[0] != "prepare active" || ev[1] != "close" {
		t.Errorf("snapshotter events %q, want prepare then one close", ev)
	}
	if _, err := os.Lstat(cfg.Address); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	// The root lock is released.
	unlock, err := lockRoot(cfg.Root)
	if err != nil {
		t.Fatalf("root still locked: %v", err)
	}
	unlock()
}

// A stop signal lets an in-flight call finish and closes the snapshotter
// only afterwards; new connections are refused meanwhile.
func TestServeWaitsForInFlightCalls(t *testing.T) {
	cfg := testConfig(t)
	sn := newTestSnapshotter(t)
	entered, release := make(chan struct{}), make(chan struct{})
	sn.prepareHook = func(context.Context) error {
		close(entered)
		<-release
		return nil
	}
	d := startServe(t, cfg, sn, nil, 30*time.Second)
	d.waitReady(t)

	client := dialSnapshotter(t, cfg.Address)
	callErr := make(chan error, 1)
	go func() {
		_, err := client.Prepare(context.Background(), "slow", "")
		callErr <- err
	}()
	<-entered
	d.cancel()

	select {
	case err := <-d.done:
		t.Fatalf("serve returned with a call in flight: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := os.Lstat(cfg.Address); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still present while draining: %v", err)
	}
	if conn, err := net.Dial("unix", cfg.Address); err == nil {
		conn.Close()
		t.Error("a new connection was accepted while draining")
	}
	if ev := sn.Events(); len(ev) != 0 {
		t.Errorf("snapshotter events before the call finished: %q", ev)
	}

	close(release)
	if err := <-callErr; err != nil {
		t.Fatalf("in-flight Prepare failed: %v", err)
	}
	if err := d.stop(t); err != nil {
		t.Fatalf("serve: %v", err)
	}
	if ev := sn.Events(); len(ev) != 2 || ev[0] != "prepare slow" || ev[1] != "close" {
		t.Errorf("snapshotter events %q, want the call to finish before close", ev)
	}
}

// A call still running at the shutdown timeout is cancelled; if it returns
// then, the snapshotter is closed as usual.
func TestServeShutdownTimeoutCancelsCalls(t *testing.T) {
	cfg := testConfig(t)
	sn := newTestSnapshotter(t)
	entered := make(chan struct{})
	sn.prepareHook = func(ctx context.Context) error {
		close(entered)
		<-ctx.Done()
		return ctx.Err()
	}
	d := startServe(t, cfg, sn, nil, 200*time.Millisecond)
	d.waitReady(t)

	client := dialSnapshotter(t, cfg.Address)
	callErr := make(chan error, 1)
	go func() {
		_, err := client.Prepare(context.Background(), "stuck", "")
		callErr <- err
	}()
	<-entered
	start := time.Now()
	if err := d.stop(t); err != nil {
		t.Fatalf("serve: %v", err)
	}
	if el := time.Since(start); el < 200*time.Millisecond || el > 5*time.Second {
		t.Errorf("serve returned after %s, want about the 200ms timeout", el)
	}
	if err := <-callErr; !errdefs.IsUnavailable(err) {
		t.Errorf("cut-off call returned %v, want Unavailable", err)
	}
	if ev := sn.Events(); len(ev) != 2 || ev[0] != "prepare stuck failed" || ev[1] != "close" {
		t.Errorf("snapshotter events %q, want the cancelled call, then close", ev)
	}
}

// A call that ignores cancellation must not hang the shutdown; the
// snapshotter, which it may still be using, is then left unclosed.
func TestServeShutdownWithStuckCall(t *testing.T) {
	cfg := testConfig(t)
	sn := newTestSnapshotter(t)
	entered, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	sn.prepareHook = func(context.Context) error {
		close(entered)
		<-release
		return nil
	}
	d := startServe(t, cfg, sn, nil, 200*time.Millisecond)
	d.waitReady(t)

	client := dialSnapshotter(t, cfg.Address)
	go func() { _, _ = client.Prepare(context.Background(), "stuck", "") }()
	<-entered
	start := time.Now()
	err := d.stop(t)
	if !errdefs.IsDeadlineExceeded(err) || !strings.Contains(err.Error(), "without closing the snapshotter") {
		t.Fatalf("serve: %v, want DeadlineExceeded", err)
	}
	if el := time.Since(start); el < 400*time.Millisecond || el > 5*time.Second {
		t.Errorf("serve returned after %s, want about twice the 200ms timeout", el)
	}
	if ev := sn.Events(); len(ev) != 0 {
		t.Errorf("snapshotter events %q, want none (no close while a call runs)", ev)
	}
	if _, err := os.Lstat(cfg.Address); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestServeRefusesLiveAddress(t *testing.T) {
	cfg := testConfig(t)
	first := startServe(t, cfg, newTestSnapshotter(t), nil, time.Second)
	first.waitReady(t)

	second := *testConfig(t)
	second.Address = cfg.Address
	d := startServe(t, &second, newTestSnapshotter(t), nil, time.Second)
	select {
	case err := <-d.done:
		d.done <- err
		if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "another process is listening") {
			t.Fatalf("second daemon: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second daemon did not fail")
	}
	select {
	case <-d.opened:
		t.Error("second daemon opened its snapshotter")
	default:
	}
	// The first daemon still serves.
	if _, err := dialSnapshotter(t, cfg.Address).Stat(context.Background(), "none"); !errdefs.IsNotFound(err) {
		t.Errorf("first daemon after the second failed: %v", err)
	}
}

func TestServeRefusesLockedRoot(t *testing.T) {
	cfg := testConfig(t)
	first := startServe(t, cfg, newTestSnapshotter(t), nil, time.Second)
	first.waitReady(t)

	second := *testConfig(t)
	second.Root = cfg.Root
	d := startServe(t, &second, newTestSnapshotter(t), nil, time.Second)
	select {
	case err := <-d.done:
		d.done <- err
		want := fmt.Sprintf("process %d holds", os.Getpid())
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "in use by another thin-snapshotter") || !strings.Contains(err.Error(), want) {
			t.Fatalf("second daemon: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second daemon did not fail")
	}
	if _, err := os.Lstat(second.Address); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("second daemon created its socket: %v", err)
	}
}

func TestServeFactoryError(t *testing.T) {
	cfg := testConfig(t)
	boom := fmt.Errorf("pool is gone: %w", errdefs.ErrFailedPrecondition)
	d := startServe(t, cfg, nil, boom, time.Second)
	var err error
	select {
	case err = <-d.done:
		d.done <- err
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not fail")
	}
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "opening snapshotter") {
		t.Fatalf("serve: %v", err)
	}
	select {
	case n := <-d.notes:
		t.Errorf("notified %q although the snapshotter failed", n)
	default:
	}
	if _, err := os.Lstat(cfg.Address); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	unlock, err := lockRoot(cfg.Root)
	if err != nil {
		t.Fatalf("root still locked: %v", err)
	}
	unlock()
}

func TestServeReportsCloseError(t *testing.T) {
	cfg := testConfig(t)
	sn := newTestSnapshotter(t)
	sn.closeErr = errors.New("database close failed")
	d := startServe(t, cfg, sn, nil, time.Second)
	d.waitReady(t)
	if err := d.stop(t); err == nil || !strings.Contains(err.Error(), "database close failed") {
		t.Fatalf("serve: %v, want the close error", err)
	}
}

func TestListenUnix(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, path string) // prepares the address
		err   string                          // substring; "" means success
		check func(t *testing.T, path string) // after the attempt
	}{
		{
			name:  "creates missing directory 0700",
			setup: func(*testing.T, string) {},
			check: func(t *testing.T, path string) {
				if m := mode(t, filepath.Dir(path)); m != 0o700 {
					t.Errorf("directory mode %o, want 700", m)
				}
			},
		},
		{
			name: "keeps an existing directory's mode",
			setup: func(t *testing.T, path string) {
				if err := os.Mkdir(filepath.Dir(path), 0o750); err != nil {
					t.Fatal(err)
				}
			},
			check: func(t *testing.T, path string) {
				if m := mode(t, filepath.Dir(path)); m != 0o750 {
					t.Errorf("directory mode %o, want 750 kept", m)
				}
			},
		},
		{
			name: "removes a stale socket",
			setup: func(t *testing.T, path string) {
				if err := os.Mkdir(filepath.Dir(path), 0o700); err != nil {
					t.Fatal(err)
				}
				l, err := net.Listen("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				l.(*net.UnixListener).SetUnlinkOnClose(false)
				l.Close()
				if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket {
					t.Fatalf("stale socket not in place: %v", err)
				}
			},
		},
		{
			name: "refuses a live socket",
			setup: func(t *testing.T, path string) {
				if err := os.Mkdir(filepath.Dir(path), 0o700); err != nil {
					t.Fatal(err)
				}
				l, err := net.Listen("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
			},
			err: "another process is listening",
			check: func(t *testing.T, path string) {
				if conn, err := net.Dial("unix", path); err != nil {
					t.Errorf("the other process's socket was disturbed: %v", err)
				} else {
					conn.Close()
				}
			},
		},
		{
			name: "refuses a regular file",
			setup: func(t *testing.T, path string) {
				if err := os.Mkdir(filepath.Dir(path), 0o700); err != nil {
					t.Fatal(err)
				}
				writeFile(t, path, "precious")
			},
			err: "is not a socket",
			check: func(t *testing.T, path string) {
				if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
					t.Errorf("file was touched: %q, %v", b, err)
				}
			},
		},
		{
			name: "refuses a directory",
			setup: func(t *testing.T, path string) {
				if err := os.MkdirAll(path, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			err: "is not a socket",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(shortTempDir(t), "run", "s.sock")
			tt.setup(t, path)
			l, err := listenUnix(context.Background(), path)
			if tt.err != "" {
				if err == nil {
					l.Close()
					t.Fatal("listenUnix succeeded")
				}
				if !strings.Contains(err.Error(), tt.err) || !errdefs.IsAlreadyExists(err) {
					t.Fatalf("listenUnix: %v, want AlreadyExists containing %q", err, tt.err)
				}
			} else {
				if err != nil {
					t.Fatalf("listenUnix: %v", err)
				}
				defer l.Close()
				if m := mode(t, path); m != 0o660 {
					t.Errorf("socket mode %o, want 660", m)
				}
				conn, err := net.Dial("unix", path)
				if err != nil {
					t.Fatalf("dialing the new socket: %v", err)
				}
				conn.Close()
			}
			if tt.check != nil {
				tt.check(t, path)
			}
		})
	}
}

// freeAddr is a loopback TCP address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestMetricsEndpoint(t *testing.T) {
	addr := freeAddr(t)

	cfg := testConfig(t)
	cfg.MetricsAddress = addr
	d := startServe(t, cfg, newTestSnapshotter(t), nil, time.Second)
	d.waitReady(t)

	client := dialSnapshotter(t, cfg.Address)
	for range 2 {
		if _, err := client.Stat(context.Background(), "missing"); !errdefs.IsNotFound(err) {
			t.Fatalf("Stat: %v", err)
		}
	}
	// A stream's error is counted by its kind, not as Unknown.
	if err := client.Walk(context.Background(), func(context.Context, snapshots.Info) error { return nil }, "name=="); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Walk with a bad filter: %v", err)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`thin_snapshotter_grpc_calls_total{code="NotFound",method="/containerd.services.snapshots.v1.Snapshots/Stat"} 2`,
		`thin_snapshotter_grpc_call_duration_seconds_count{method="/containerd.services.snapshots.v1.Snapshots/Stat"} 2`,
		`thin_snapshotter_grpc_calls_total{code="InvalidArgument",method="/containerd.services.snapshots.v1.Snapshots/List"} 1`,
		"go_goroutines",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if err := d.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get("http://" + addr + "/metrics"); err == nil {
		t.Error("metrics endpoint still up after stop")
	}
}

func TestMetricsAddressInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := testConfig(t)
	cfg.MetricsAddress = l.Addr().String()
	d := startServe(t, cfg, newTestSnapshotter(t), nil, time.Second)
	select {
	case err := <-d.done:
		d.done <- err
		if err == nil || !strings.Contains(err.Error(), "metrics_address") {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not fail")
	}
	select {
	case <-d.opened:
		t.Error("snapshotter opened although metrics could not start")
	default:
	}
}

// Size classes need the thin snapshotter: with another one the daemon
// refuses to start, closes it and leaves no class socket behind.
func TestServeClassesNeedThin(t *testing.T) {
	root := shortTempDir(t)
	ts := &testSnapshotter{}
	factory := func(context.Context, *config.Config) (snapshots.Snapshotter, error) {
		n, err := native.NewSnapshotter(filepath.Join(root, "native"))
		ts.Snapshotter = n
		return ts, err
	}
	_, _, err := serveForTest(context.Background(), root, factory, func(c *config.Config) {
		c.Classes = []config.ClassConfig{{Name: "big", Size: c.Snapshot.BaseSize}}
	})
	if !errdefs.IsNotImplemented(err) {
		t.Fatalf("serve with classes on a snapshotter without them: %v, want NotImplemented", err)
	}
	if got := ts.Events(); !slices.Contains(got, "close") {
		t.Errorf("snapshotter events %v, want it closed", got)
	}
	if _, err := os.Stat(filepath.Join(root, "big.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("class socket left behind: %v", err)
	}
}
