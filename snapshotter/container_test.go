package snapshotter

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

func TestIsContainerKey(t *testing.T) {
	for _, tc := range []struct {
		key  string
		want bool
	}{
		{"k8s.io/12/abc", true},
		{"k8s.io/0/abc", true},
		{"k8s.io/12/abcd", false},
		{"k8s.io/12/ab", false},
		{"default/12/abc", false},
		{"k8s.io/x12/abc", false},
		{"k8s.io//abc", false},
		{"k8s.io/12/abc/def", false},
		{"k8s.io/abc", false},
		{"abc", false},
		{"k8s.iox/12/abc", false},
	} {
		if got := isContainerKey(tc.key, "k8s.io", "abc"); got != tc.want {
			t.Errorf("isContainerKey(%q) = %v, want %v", tc.key, got, tc.want)
		}
	}
}

// TestFindContainer: the root filesystem snapshot of a CRI container is
// found by the container's id in containerd's key, on the main socket and
// in a size class; everything else is not it.
func TestFindContainer(t *testing.T) {
	ctx := context.Background()
	s := mustNew(t, t.TempDir(), newFakePool("pool"), func(c *Config) {
		c.Classes = []SizeClass{{Name: "big", Size: 1 << 30}}
	})
	var g grown
	g.hook(s)
	big, err := s.Class("big")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"k8s.io/1/layer", "k8s.io/3/committed-ctr"} {
		if _, err := s.Prepare(ctx, k+"-active", ""); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(ctx, k, k+"-active"); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []string{"k8s.io/2/ctr-a", "default/4/ctr-b", "k8s.io/5/dup"} {
		if _, err := s.Prepare(ctx, k, "k8s.io/1/layer"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.View(ctx, "k8s.io/6/view", "k8s.io/1/layer"); err != nil {
		t.Fatal(err)
	}
	// Classes number their keys on their own.
	for _, k := range []string{"k8s.io/2/ctr-c", "k8s.io/9/dup"} {
		if _, err := big.Prepare(ctx, k, ""); err != nil {
			t.Fatal(err)
		}
	}

	for _, tc := range []struct {
		ns, id string
		want   ContainerSnapshot
		err    error
	}{
		{ns: "k8s.io", id: "ctr-a", want: ContainerSnapshot{Key: "k8s.io/2/ctr-a", Size: 64 << 20}},
		{ns: "k8s.io", id: "ctr-c", want: ContainerSnapshot{Key: "@big/k8s.io/2/ctr-c", Class: "big", Size: 1 << 30}},
		{ns: "default", id: "ctr-b", want: ContainerSnapshot{Key: "default/4/ctr-b", Size: 64 << 20}},
		{ns: "k8s.io", id: "ctr-b", err: errdefs.ErrNotFound},
		{ns: "k8s.io", id: "committed-ctr", err: errdefs.ErrNotFound},
		{ns: "k8s.io", id: "view", err: errdefs.ErrNotFound},
		{ns: "k8s.io", id: "ctr", err: errdefs.ErrNotFound},
		{ns: "k8s.io", id: "dup", err: errdefs.ErrFailedPrecondition},
		{ns: "k8s.io", id: "", err: errdefs.ErrInvalidArgument},
		{ns: "k8s.io", id: "2/ctr-a", err: errdefs.ErrInvalidArgument},
		{ns: "", id: "ctr-a", err: errdefs.ErrInvalidArgument},
	} {
		got, err := s.FindContainer(ctx, tc.ns, tc.id)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("FindContainer(%q, %q) = %+v, %v; want %v", tc.ns, tc.id, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("FindContainer(%q, %q) = %+v, %v; want %+v", tc.ns, tc.id, got, err, tc.want)
		}
	}
}

func TestGrowContainer(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) {
		c.Classes = []SizeClass{{Name: "big", Size: 1 << 30}}
	})
	var g grown
	g.hook(s)
	big, err := s.Class("big")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "k8s.io/1/a", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := big.Prepare(ctx, "k8s.io/1/b", ""); err != nil {
		t.Fatal(err)
	}
	grows := len(g.calls) // the class's Prepare grew b to 1 GiB

	for _, tc := range []struct {
		name        string
		key         string
		size, want  uint64
		grew        bool
		sectorsWant uint64
	}{
		{"below the base size: kept", "k8s.io/1/a", 16 << 20, 64 << 20, false, 64 << 20},
		{"grown, rounded down to blocks", "k8s.io/1/a", 2<<30 + 1000, 2 << 30, true, 2 << 30},
		{"the same again: nothing to do", "k8s.io/1/a", 2 << 30, 2 << 30, false, 2 << 30},
		{"smaller than an earlier grow: kept", "k8s.io/1/a", 1 << 30, 2 << 30, false, 2 << 30},
		{"below the class: kept", "@big/k8s.io/1/b", 512 << 20, 1 << 30, false, 1 << 30},
		{"the class's size: nothing to do", "@big/k8s.io/1/b", 1 << 30, 1 << 30, false, 1 << 30},
		{"above the class: grown", "@big/k8s.io/1/b", 3 << 30, 3 << 30, true, 3 << 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.GrowContainer(ctx, tc.key, tc.size)
			if err != nil || got != tc.want {
				t.Fatalf("GrowContainer(%d) = %d, %v; want %d", tc.size, got, err, tc.want)
			}
			if n := len(g.calls) - grows; (n == 1) != tc.grew || n > 1 {
				t.Errorf("%d filesystem grows, want grown %v", n, tc.grew)
			}
			grows = len(g.calls)
			snap := snapOf(t, s, tc.key)
			if snap.Size != tc.want || deviceSectors(pool, s, tc.key) != dmsetup.BytesToSectors(tc.sectorsWant) {
				t.Errorf("record size %d, device %d sectors; want %d bytes", snap.Size, deviceSectors(pool, s, tc.key), tc.want)
			}
			if tc.grew && snap.Labels[snapshots.LabelSnapshotMaxSize] != strconv.FormatUint(tc.want, 10) {
				t.Errorf("labels %v do not record the size %d", snap.Labels, tc.want)
			}
		})
	}

	// A committed snapshot or a missing key is not a container's.
	if _, err := s.Prepare(ctx, "l-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "l", "l-active"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GrowContainer(ctx, "l", 1<<30); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("committed: %v, want FailedPrecondition", err)
	}
	if _, err := s.GrowContainer(ctx, "gone", 1<<30); !errdefs.IsNotFound(err) {
		t.Errorf("missing: %v, want NotFound", err)
	}
	// Larger than any device: refused, nothing changed.
	if _, err := s.GrowContainer(ctx, "k8s.io/1/a", maxDeviceSize+BaseSizeAlign); !errdefs.IsInvalidArgument(err) {
		t.Errorf("beyond the largest device: %v, want InvalidArgument", err)
	}
	checkConsistent(t, s, pool)
}

// TestGrowContainerRetry: a filesystem grow that fails leaves the device
// grown and the label as it was; asking again grows the filesystem again.
func TestGrowContainerRetry(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool)
	var g grown
	g.hook(s)
	if _, err := s.Prepare(ctx, "k8s.io/1/a", ""); err != nil {
		t.Fatal(err)
	}
	g.err = errors.New("resize2fs failed")
	if _, err := s.GrowContainer(ctx, "k8s.io/1/a", 1<<30); err == nil {
		t.Fatal("a failing grow succeeded")
	}
	if snap := snapOf(t, s, "k8s.io/1/a"); snap.Size != 1<<30 || snap.Labels[snapshots.LabelSnapshotMaxSize] != "" {
		t.Fatalf("after the failed grow: size %d, labels %v", snap.Size, snap.Labels)
	}
	g.err = nil
	if got, err := s.GrowContainer(ctx, "k8s.io/1/a", 1<<30); err != nil || got != 1<<30 || len(g.calls) != 2 {
		t.Fatalf("retry: %d, %v, %d grows; want 1 GiB and the filesystem grown again", got, err, len(g.calls))
	}
	checkConsistent(t, s, pool)
}

// TestMountsWaitForGrow: Mounts of a key waits while its filesystem grows,
// so a container never mounts a filesystem that is growing offline.
func TestMountsWaitForGrow(t *testing.T) {
	ctx := context.Background()
	s := mustNew(t, t.TempDir(), newFakePool("pool"))
	if _, err := s.Prepare(ctx, "k8s.io/1/a", ""); err != nil {
		t.Fatal(err)
	}
	growing, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	s.growFS = func(context.Context, string, string) error {
		once.Do(func() { close(growing) })
		<-release
		return nil
	}
	grew := make(chan error, 1)
	go func() {
		_, err := s.GrowContainer(ctx, "k8s.io/1/a", 1<<30)
		grew <- err
	}()
	<-growing
	mounted := make(chan error, 1)
	go func() {
		_, err := s.Mounts(ctx, "k8s.io/1/a")
		mounted <- err
	}()
	select {
	case err := <-mounted:
		t.Fatalf("Mounts returned (%v) while the filesystem was growing", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if err := <-grew; err != nil {
		t.Fatal(err)
	}
	if err := <-mounted; err != nil {
		t.Fatal(err)
	}
}
