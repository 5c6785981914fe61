package main

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// openSnapshotter opens the snapshotter the daemon serves, as cfg
// configures it.
func openSnapshotter(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error) {
	return snapshotter.New(ctx, cfg.Snapshotter())
}
