package main

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// TestIntegrationSuiteGRPC runs containerd's snapshotter testsuite through
// the daemon's socket (containerd's proxy client) against the thin
// snapshotter on a real kernel: the path containerd itself takes.
func TestIntegrationSuiteGRPC(t *testing.T) {
	dmtest.Require(t)
	testsuite.SnapshotterSuite(t, "grpc-thin", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		var daemonRoot string
		factory := func(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error) {
			sc := cfg.Snapshotter()
			// Small pool and filesystems: the VM is slow.
			sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
			daemonRoot = cfg.Root
			return snapshotter.New(ctx, sc)
		}
		sn, stop, err := serveForTest(ctx, root, factory)
		if err != nil {
			return nil, nil, err
		}
		return sn, func() error {
			if err := stop(); err != nil {
				return err
			}
			pool, err := snapshotter.LoopPoolName(daemonRoot)
			if err != nil {
				return err
			}
			return dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(daemonRoot, "pool"))
		}, nil
	})
}
