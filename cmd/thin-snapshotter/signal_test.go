package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// TestMain doubles as the daemon for the signal tests: they run the test
// binary again with THIN_TEST_HELPER_DAEMON set, and then it is the daemon's
// main, serving containerd's native snapshotter as the test double.
func TestMain(m *testing.M) {
	if dir := os.Getenv("THIN_TEST_HELPER_DAEMON"); dir != "" {
		open := func(context.Context, *config.Config) (snapshots.Snapshotter, error) {
			return native.NewSnapshotter(filepath.Join(dir, "native"))
		}
		args := append([]string{"thin-snapshotter"}, strings.Fields(os.Getenv("THIN_TEST_HELPER_ARGS"))...)
		os.Exit(run(args, open, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// The real process: flags, signal handling and sd_notify over
// NOTIFY_SOCKET, as systemd runs it. The flags override the file's
// log_level.
func TestDaemonProcessStopsOnSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := shortTempDir(t)
			root, sock := filepath.Join(dir, "root"), filepath.Join(dir, "run", "thin.sock")
			notifyPath := filepath.Join(dir, "notify")
			notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer notify.Close()

			cfgPath := filepath.Join(dir, "config.toml")
			writeFile(t, cfgPath, "log_level = \"info\"\n")
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(),
				"THIN_TEST_HELPER_DAEMON="+dir,
				"THIN_TEST_HELPER_ARGS=--config "+cfgPath+" --root "+root+" --address "+sock+" --log-level debug",
				"NOTIFY_SOCKET="+notifyPath,
			)
			var out syncBuffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			defer func() {
				if cmd.ProcessState == nil {
					cmd.Process.Kill()
					<-exited
				}
			}()

			if got := readNotify(t, notify); got != "READY=1" {
				t.Fatalf("first notification %q, want READY=1\n%s", got, out.String())
			}
			if _, err := dialSnapshotter(t, sock).Stat(context.Background(), "none"); !errdefs.IsNotFound(err) {
				t.Fatalf("Stat through the daemon: %v", err)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			if got := readNotify(t, notify); got != "STOPPING=1" {
				t.Errorf("notification after %s %q, want STOPPING=1", sig, got)
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("daemon exited with %v after %s\n%s", err, sig, out.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("daemon still running 20s after %s\n%s", sig, out.String())
			}
			for _, want := range []string{"level=debug", "embedded loopback pool", "serving containerd snapshots API", "snapshotter closed"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("daemon output lacks %q:\n%s", want, out.String())
				}
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket left behind: %v", err)
			}
		})
	}
}

// syncBuffer is written by exec's copying goroutine and read by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func readNotify(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reading sd_notify: %v", err)
	}
	return string(buf[:n])
}
