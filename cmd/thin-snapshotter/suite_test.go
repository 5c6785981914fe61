package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// TestSnapshotterSuiteThroughSocket runs containerd's snapshotter testsuite
// against a served daemon through containerd's proxy client, proving the
// gRPC path. containerd's native snapshotter stands in for the thin one
// here; it needs root for its bind mounts.
func TestSnapshotterSuiteThroughSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("THIN_TEST_REQUIRE_DM") == "1" {
			t.Fatal("THIN_TEST_REQUIRE_DM=1 but not running as root")
		}
		t.Skip("the testsuite mounts snapshots: needs root")
	}
	testsuite.SnapshotterSuite(t, "grpc-native", serveForSuite(func(root string) snapshotterFactory {
		return func(context.Context, *config.Config) (snapshots.Snapshotter, error) {
			return native.NewSnapshotter(filepath.Join(root, "native"))
		}
	}))
}

// serveForSuite adapts a daemon to the testsuite: for each test it starts
// serve with the snapshotter from newFactory(root), its state and socket
// under root, and returns containerd's proxy client to it. The cleanup
// stops the daemon and returns serve's result.
func serveForSuite(newFactory func(root string) snapshotterFactory) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return serveForTest(ctx, root, newFactory(root))
	}
}

func serveForTest(ctx context.Context, root string, factory snapshotterFactory, mod ...func(*config.Config)) (snapshots.Snapshotter, func() error, error) {
	cfg := config.Default()
	cfg.Root = filepath.Join(root, "daemon")
	cfg.Address = filepath.Join(root, "thin.sock")
	cfg.LogLevel = "warn"
	for _, m := range mod {
		m(cfg)
	}
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	ready := make(chan struct{}, 1)
	opts := serveOptions{
		notify: func(s string) error {
			if s == daemon.SdNotifyReady {
				ready <- struct{}{}
			}
			return nil
		},
		shutdownTimeout: 10 * time.Second,
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- serve(sctx, cfg, factory, opts) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		return nil, nil, fmt.Errorf("daemon failed to start: %w", err)
	case <-time.After(30 * time.Second):
		cancel()
		return nil, nil, errors.New("daemon not ready after 30s")
	}
	conn, err := grpc.NewClient("unix://"+cfg.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cancel()
		return nil, nil, errors.Join(err, <-done)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin")
	cleanup := func() error {
		cerr := conn.Close()
		cancel()
		return errors.Join(cerr, <-done)
	}
	return sn, cleanup, nil
}
