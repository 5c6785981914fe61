package main

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"

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

// TestIntegrationErrorKindsGRPC: the kinds the thin snapshotter returns on a
// real kernel reach containerd's proxy client intact, List (Walk)
// included.
func TestIntegrationErrorKindsGRPC(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := shortTempDir(t)
	var minFreeData float64
	var daemonRoot string
	factory := func(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error) {
		sc := cfg.Snapshotter()
		sc.DataSize, sc.MetadataSize, sc.BaseSize = 1<<30, 16<<20, 64<<20
		sc.MinFreeData = minFreeData
		daemonRoot = cfg.Root
		return snapshotter.New(ctx, sc)
	}
	t.Cleanup(func() {
		if daemonRoot == "" {
			return
		}
		pool, err := snapshotter.LoopPoolName(daemonRoot)
		if err == nil {
			err = dmtest.DestroyLoopPool(context.Background(), pool, filepath.Join(daemonRoot, "pool"))
		}
		if err != nil {
			t.Error(err)
		}
	})
	want := func(what string, err error, is func(error) bool) {
		t.Helper()
		if err == nil || !is(err) {
			t.Errorf("%s: %v (%T)", what, err, err)
		}
	}

	client, stop, err := serveForTest(ctx, root, factory)
	if err != nil {
		t.Fatal(err)
	}
	_, err = client.Stat(ctx, "missing")
	want("Stat of a missing key", err, errdefs.IsNotFound)
	if _, err := client.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	_, err = client.Prepare(ctx, "a", "")
	want("Prepare of an existing key", err, errdefs.IsAlreadyExists)
	err = client.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }, "name==")
	want("Walk with a bad filter", err, errdefs.IsInvalidArgument)
	_, err = client.Update(ctx, snapshots.Info{Name: "a"}, "kind")
	want("Update of a read-only field", err, errdefs.IsInvalidArgument)
	if err := client.Commit(ctx, "image", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Prepare(ctx, "b", "image"); err != nil {
		t.Fatal(err)
	}
	err = client.Remove(ctx, "image")
	want("Remove of a parent", err, errdefs.IsFailedPrecondition)
	_, err = client.View(ctx, "v", "missing")
	want("View of a missing parent", err, errdefs.IsNotFound)
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// The same root again, with a threshold the pool is already past.
	minFreeData = 99.99
	client, stop, err = serveForTest(ctx, root, factory)
	if err != nil {
		t.Fatal(err)
	}
	_, err = client.Prepare(ctx, "c", "image")
	want("Prepare below the free-space threshold", err, errdefs.IsResourceExhausted)
	if _, err := client.Mounts(ctx, "b"); err != nil {
		t.Errorf("Mounts of an existing snapshot below the threshold: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
