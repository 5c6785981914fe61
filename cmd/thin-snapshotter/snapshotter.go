package main

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// openSnapshotter is the snapshotter the daemon serves.
func openSnapshotter(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error) {
	return snapshotter.New(ctx, snapshotterConfig(cfg))
}

func snapshotterConfig(cfg *config.Config) snapshotter.Config {
	return snapshotter.Config{
		Root:         cfg.Root,
		PoolName:     cfg.Pool.Name,
		DataSize:     uint64(cfg.Pool.DataSize),
		MetadataSize: uint64(cfg.Pool.MetadataSize),
		BlockSize:    uint64(cfg.Pool.BlockSize),
		AllowAdopt:   cfg.Pool.AllowAdopt,
		// The snapshotter reads 0 as its default: a disabled check is
		// negative there.
		MinFreeData:     disabledIfZero(cfg.Pool.MinFreeData),
		MinFreeMetadata: disabledIfZero(cfg.Pool.MinFreeMetadata),
		BaseSize:        uint64(cfg.Snapshot.BaseSize),
		FSType:          cfg.Snapshot.FSType,
		MkfsOptions:     cfg.Snapshot.MkfsOptions,
		MountOptions:    cfg.Snapshot.MountOptions,
		AsyncRemove:     cfg.Snapshot.AsyncRemove,
		Discard:         cfg.Snapshot.Discard,
	}
}

func disabledIfZero(pct float64) float64 {
	if pct == 0 {
		return -1
	}
	return pct
}
