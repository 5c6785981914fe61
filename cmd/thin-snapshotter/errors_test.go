package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// failingSnapshotter fails every call with the error set last.
type failingSnapshotter struct {
	mu  sync.Mutex
	err error
}

func (f *failingSnapshotter) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

func (f *failingSnapshotter) fail() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func (f *failingSnapshotter) Stat(context.Context, string) (snapshots.Info, error) {
	return snapshots.Info{}, f.fail()
}

func (f *failingSnapshotter) Update(context.Context, snapshots.Info, ...string) (snapshots.Info, error) {
	return snapshots.Info{}, f.fail()
}

func (f *failingSnapshotter) Usage(context.Context, string) (snapshots.Usage, error) {
	return snapshots.Usage{}, f.fail()
}

func (f *failingSnapshotter) Mounts(context.Context, string) ([]mount.Mount, error) {
	return nil, f.fail()
}

func (f *failingSnapshotter) Prepare(context.Context, string, string, ...snapshots.Opt) ([]mount.Mount, error) {
	return nil, f.fail()
}

func (f *failingSnapshotter) View(context.Context, string, string, ...snapshots.Opt) ([]mount.Mount, error) {
	return nil, f.fail()
}

func (f *failingSnapshotter) Commit(context.Context, string, string, ...snapshots.Opt) error {
	return f.fail()
}

func (f *failingSnapshotter) Remove(context.Context, string) error { return f.fail() }

func (f *failingSnapshotter) Walk(context.Context, snapshots.WalkFunc, ...string) error {
	return f.fail()
}

func (f *failingSnapshotter) Cleanup(context.Context) error { return f.fail() }

func (f *failingSnapshotter) Close() error { return nil }

// snapshotCalls are every call of containerd's snapshots API, made through
// a client, each returning the call's error.
var snapshotCalls = []struct {
	name string
	call func(ctx context.Context, c snapshots.Snapshotter) error
}{
	{"Stat", func(ctx context.Context, c snapshots.Snapshotter) error { _, err := c.Stat(ctx, "k"); return err }},
	{"Update", func(ctx context.Context, c snapshots.Snapshotter) error {
		_, err := c.Update(ctx, snapshots.Info{Name: "k"}, "labels.x")
		return err
	}},
	{"Usage", func(ctx context.Context, c snapshots.Snapshotter) error { _, err := c.Usage(ctx, "k"); return err }},
	{"Mounts", func(ctx context.Context, c snapshots.Snapshotter) error { _, err := c.Mounts(ctx, "k"); return err }},
	{"Prepare", func(ctx context.Context, c snapshots.Snapshotter) error {
		_, err := c.Prepare(ctx, "k", "")
		return err
	}},
	{"View", func(ctx context.Context, c snapshots.Snapshotter) error { _, err := c.View(ctx, "k", "p"); return err }},
	{"Commit", func(ctx context.Context, c snapshots.Snapshotter) error { return c.Commit(ctx, "n", "k") }},
	{"Remove", func(ctx context.Context, c snapshots.Snapshotter) error { return c.Remove(ctx, "k") }},
	{"Walk", func(ctx context.Context, c snapshots.Snapshotter) error {
		return c.Walk(ctx, func(context.Context, snapshots.Info) error { return nil })
	}},
	{"Cleanup", func(ctx context.Context, c snapshots.Snapshotter) error {
		cl, ok := c.(snapshots.Cleaner)
		if !ok {
			return errors.New("the proxy client has no Cleanup")
		}
		return cl.Cleanup(ctx)
	}},
}

// Every errdefs kind the snapshotter returns reaches containerd's proxy
// client intact, from every call, with its message.
func TestErrorKindsThroughSocket(t *testing.T) {
	cfg := testConfig(t)
	sn := &failingSnapshotter{}
	d := startServe(t, cfg, sn, nil, 5*time.Second)
	d.waitReady(t)
	client := dialSnapshotter(t, cfg.Address)

	kinds := []struct {
		kind error
		is   func(error) bool
	}{
		{errdefs.ErrNotFound, errdefs.IsNotFound},
		{errdefs.ErrAlreadyExists, errdefs.IsAlreadyExists},
		{errdefs.ErrFailedPrecondition, errdefs.IsFailedPrecondition},
		{errdefs.ErrInvalidArgument, errdefs.IsInvalidArgument},
		{errdefs.ErrResourceExhausted, errdefs.IsResourceExhausted},
		{errdefs.ErrUnavailable, errdefs.IsUnavailable},
		{errdefs.ErrPermissionDenied, errdefs.IsPermissionDenied},
		{errdefs.ErrNotImplemented, errdefs.IsNotImplemented},
		{errdefs.ErrAborted, errdefs.IsAborted},
		{errdefs.ErrOutOfRange, errdefs.IsOutOfRange},
		{errdefs.ErrInternal, errdefs.IsInternal},
		{errdefs.ErrDataLoss, errdefs.IsDataLoss},
		// No gRPC code of its own; errgrpc carries it in the message.
		{errdefs.ErrConflict, errdefs.IsConflict},
		{context.DeadlineExceeded, errdefs.IsDeadlineExceeded},
		// An error of no kind stays of no kind.
		{errors.New("disk on fire"), errdefs.IsUnknown},
	}
	for _, k := range kinds {
		t.Run(k.kind.Error(), func(t *testing.T) {
			sent := fmt.Errorf("pool tp: device 7: %w", k.kind)
			sn.set(sent)
			for _, c := range snapshotCalls {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := c.call(ctx, client)
				cancel()
				if err == nil || !k.is(err) {
					t.Errorf("%s: got %v (%T), want the kind of %q", c.name, err, err, sent)
					continue
				}
				if !strings.Contains(err.Error(), sent.Error()) {
					t.Errorf("%s: message %q lost %q", c.name, err, sent)
				}
			}
		})
	}
}
