package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// backend looks at a snapshotter's own storage, below containerd's
// metadata: containerd's Remove only drops its record, and its garbage
// collector removes the backend's snapshot later.
type backend interface {
	// count is the number of snapshots the backend holds.
	count(ctx context.Context) (int, error)
	// watch is called before containerd removes key; the returned
	// function reports whether the backend no longer holds it.
	watch(ctx context.Context, key string) (gone func(context.Context) (bool, error), err error)
	// interval is how often to ask.
	interval() time.Duration
}

// countBackend tells a snapshot is gone when the backend holds one fewer:
// the chain workload removes one snapshot at a time and waits.
type countBackend struct {
	fn    func(ctx context.Context) (int, error)
	every time.Duration
}

func (c countBackend) count(ctx context.Context) (int, error) { return c.fn(ctx) }
func (c countBackend) interval() time.Duration                { return c.every }

func (c countBackend) watch(ctx context.Context, _ string) (func(context.Context) (bool, error), error) {
	n0, err := c.fn(ctx)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (bool, error) {
		n, err := c.fn(ctx)
		return n < n0, err
	}, nil
}

// overlayBackend counts overlayfs's snapshot directories.
func overlayBackend(root string) backend {
	return countBackend{func(context.Context) (int, error) {
		ents, err := os.ReadDir(root)
		return len(ents), err
	}, 5 * time.Millisecond}
}

// devmapperBackend counts the thin devices in devmapper's pool. Each look
// reserves a metadata snapshot, a pool metadata commit: not too often.
func devmapperBackend(p *dmPool) backend {
	return countBackend{p.thinDevices, 100 * time.Millisecond}
}

// thinBackend asks the thin-snapshotter daemon itself, over its own socket
// with containerd's snapshots proxy client, for containerd's snapshot
// "<namespace>/<id>/<key>".
type thinBackend struct {
	sn snapshots.Snapshotter
	ns string
}

func (t thinBackend) interval() time.Duration { return 5 * time.Millisecond }

func (t thinBackend) count(ctx context.Context) (int, error) {
	n := 0
	err := t.sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if strings.HasPrefix(i.Name, t.ns+"/") {
			n++
		}
		return nil
	})
	return n, err
}

func (t thinBackend) watch(ctx context.Context, key string) (func(context.Context) (bool, error), error) {
	var names []string
	err := t.sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if strings.HasPrefix(i.Name, t.ns+"/") && strings.HasSuffix(i.Name, "/"+key) {
			names = append(names, i.Name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(names) != 1 {
		return nil, fmt.Errorf("thin-snapshotter holds %d snapshots for containerd's %q: %v", len(names), key, names)
	}
	return func(ctx context.Context) (bool, error) {
		_, err := t.sn.Stat(ctx, names[0])
		if errdefs.IsNotFound(err) {
			return true, nil
		}
		return false, err
	}, nil
}

var errTimeout = errors.New("timed out")

// pollUntil calls done until it reports true, every interval, for at most
// timeout.
func pollUntil(ctx context.Context, timeout, interval time.Duration, what string, done func(context.Context) (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := done(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not done after %s: %w", what, timeout, errTimeout)
		}
		time.Sleep(interval)
	}
}
