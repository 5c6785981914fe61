package snapshotter

import (
	"context"
	"errors"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

func TestRequestedSize(t *testing.T) {
	const cur = 64 << 20
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   uint64
		err    error
	}{
		{"no label", nil, 0, nil},
		{"same", map[string]string{snapshots.LabelSnapshotMaxSize: strconv.Itoa(cur)}, cur, nil},
		{"larger, rounded down", map[string]string{snapshots.LabelSnapshotMaxSize: strconv.Itoa(1<<30 + 100)}, 1 << 30, nil},
		{"smaller", map[string]string{snapshots.LabelSnapshotMaxSize: strconv.Itoa(cur - 4096)}, 0, errdefs.ErrInvalidArgument},
		{"not a number", map[string]string{snapshots.LabelSnapshotMaxSize: "10G"}, 0, errdefs.ErrInvalidArgument},
		{"negative", map[string]string{snapshots.LabelSnapshotMaxSize: "-1"}, 0, errdefs.ErrInvalidArgument},
		{"empty", map[string]string{snapshots.LabelSnapshotMaxSize: ""}, 0, errdefs.ErrInvalidArgument},
		{"too large", map[string]string{snapshots.LabelSnapshotMaxSize: strconv.FormatUint(maxDeviceSize+4096, 10)}, 0, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := requestedSize(tc.labels, cur)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("got %d, %v; want %v", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

// grown records the grow calls of a snapshotter on a fake pool.
type grown struct {
	calls []string
	err   error
}

func (g *grown) hook(s *Snapshotter) {
	s.growFS = func(_ context.Context, dev, _ string) error {
		g.calls = append(g.calls, dev)
		return g.err
	}
}

func sizeOf(t *testing.T, s *Snapshotter, key string) uint64 {
	t.Helper()
	return snapOf(t, s, key).Size
}

func deviceSectors(p *fakePool, s *Snapshotter, key string) dmsetup.Sectors {
	snap, _ := s.ready(context.Background(), key)
	p.mu.Lock()
	defer p.mu.Unlock()
	if d, ok := p.devices[s.deviceName(snap.DeviceID)]; ok {
		return d.sectors
	}
	return 0
}

func maxSize(n uint64) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: strconv.FormatUint(n, 10)})
}

func TestMaxSizePrepare(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool)
	var g grown
	g.hook(s)

	if _, err := s.Prepare(ctx, "plain", ""); err != nil {
		t.Fatal(err)
	}
	if len(g.calls) != 0 || sizeOf(t, s, "plain") != 64<<20 {
		t.Fatalf("plain prepare: grow calls %v, size %d", g.calls, sizeOf(t, s, "plain"))
	}
	if _, err := s.Prepare(ctx, "big", "", maxSize(1<<30)); err != nil {
		t.Fatal(err)
	}
	if len(g.calls) != 1 || sizeOf(t, s, "big") != 1<<30 || deviceSectors(pool, s, "big") != dmsetup.BytesToSectors(1<<30) {
		t.Fatalf("max-size prepare: grow calls %v, size %d, device %d sectors", g.calls, sizeOf(t, s, "big"), deviceSectors(pool, s, "big"))
	}
	// The committed layer keeps its size; a child cannot be smaller.
	if err := s.Commit(ctx, "big-layer", "big"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "child", "big-layer"); err != nil || sizeOf(t, s, "child") != 1<<30 {
		t.Fatalf("child of a grown layer: %v, size %d", err, sizeOf(t, s, "child"))
	}
	if _, err := s.Prepare(ctx, "smaller", "big-layer", maxSize(512<<20)); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("smaller than parent: got %v, want InvalidArgument", err)
	}
	if _, err := s.Prepare(ctx, "bad", "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: "lots"})); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("bad label: got %v, want InvalidArgument", err)
	}
	// A view cannot grow its read-only filesystem: the label is a no-op.
	if _, err := s.View(ctx, "view", "big-layer", maxSize(2<<30)); err != nil || sizeOf(t, s, "view") != 1<<30 {
		t.Fatalf("view: %v, size %d", err, sizeOf(t, s, "view"))
	}
	// A failed grow leaves no record and no device.
	g.err = errors.New("resize2fs failed")
	if _, err := s.Prepare(ctx, "fails", "", maxSize(1<<30)); err == nil {
		t.Fatal("prepare with a failing grow succeeded")
	}
	if _, err := s.Stat(ctx, "fails"); !errdefs.IsNotFound(err) {
		t.Fatalf("record of a failed grow: %v", err)
	}
	checkConsistent(t, s, pool)
}

func TestMaxSizeUpdate(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool)
	var g grown
	g.hook(s)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	up := func(n string) error {
		_, err := s.Update(ctx, snapshots.Info{Name: "a", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: n}}, "labels."+snapshots.LabelSnapshotMaxSize)
		return err
	}
	if err := up(strconv.Itoa(1 << 30)); err != nil {
		t.Fatal(err)
	}
	if len(g.calls) != 1 || sizeOf(t, s, "a") != 1<<30 || deviceSectors(pool, s, "a") != dmsetup.BytesToSectors(1<<30) {
		t.Fatalf("grow: calls %v, size %d, device %d sectors", g.calls, sizeOf(t, s, "a"), deviceSectors(pool, s, "a"))
	}
	if err := up(strconv.Itoa(512 << 20)); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("lowering: got %v, want InvalidArgument", err)
	}
	if info, _ := s.Stat(ctx, "a"); info.Labels[snapshots.LabelSnapshotMaxSize] != strconv.Itoa(1<<30) {
		t.Fatalf("a refused update changed the labels: %v", info.Labels)
	}
	// Same size again: nothing to grow.
	if err := up(strconv.Itoa(1 << 30)); err != nil || len(g.calls) != 1 {
		t.Fatalf("same size: %v, calls %v", err, g.calls)
	}
	// A failed grow keeps the old labels (so it can be retried) and the
	// size the device has.
	g.err = errors.New("xfs_growfs failed")
	if err := up(strconv.Itoa(2 << 30)); err == nil {
		t.Fatal("failing grow succeeded")
	}
	if info, _ := s.Stat(ctx, "a"); info.Labels[snapshots.LabelSnapshotMaxSize] != strconv.Itoa(1<<30) || sizeOf(t, s, "a") != 2<<30 {
		t.Fatalf("after a failed grow: labels %v, size %d", info.Labels, sizeOf(t, s, "a"))
	}
	g.err = nil
	if err := up(strconv.Itoa(2 << 30)); err != nil || len(g.calls) != 3 {
		t.Fatalf("retry: %v, calls %v", err, g.calls)
	}
	// Committed snapshots only keep the label.
	if err := s.Commit(ctx, "layer", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Update(ctx, snapshots.Info{Name: "layer", Labels: map[string]string{snapshots.LabelSnapshotMaxSize: "1"}}); err != nil || len(g.calls) != 3 {
		t.Fatalf("committed: %v, calls %v", err, g.calls)
	}
	checkConsistent(t, s, pool)
}

func TestClasses(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) {
		c.Classes = []SizeClass{{Name: "big", Size: 1 << 30}, {Name: "huge", Size: 4 << 30}}
	})
	var g grown
	g.hook(s)
	big, err := s.Class("big")
	if err != nil {
		t.Fatal(err)
	}
	huge, _ := s.Class("huge")
	if _, err := s.Class("nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("unknown class: %v", err)
	}
	// The same keys in three spaces.
	for _, sn := range []snapshots.Snapshotter{s, big, huge} {
		mustLayer(ctx, t, sn, "layer", "k", "")
		if _, err := sn.Prepare(ctx, "k", "layer"); err != nil {
			t.Fatal(err)
		}
	}
	if got := sizeOf(t, s, "k"); got != 64<<20 {
		t.Fatalf("default space size %d", got)
	}
	if got := sizeOf(t, s, "@big/k"); got != 1<<30 {
		t.Fatalf("class big size %d", got)
	}
	if got := sizeOf(t, s, "@huge/k"); got != 4<<30 {
		t.Fatalf("class huge size %d", got)
	}
	// An explicit label wins over the class size.
	if _, err := big.Prepare(ctx, "explicit", "", maxSize(2<<30)); err != nil || sizeOf(t, s, "@big/explicit") != 2<<30 {
		t.Fatalf("explicit size in a class: %v", err)
	}
	for _, tc := range []struct {
		sn   snapshots.Snapshotter
		want []string
	}{{s, []string{"k", "layer"}}, {big, []string{"explicit", "k", "layer"}}, {huge, []string{"k", "layer"}}} {
		var got []string
		if err := tc.sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
			got = append(got, i.Name)
			if i.Name == "k" && i.Parent != "layer" {
				t.Errorf("parent of k is %q", i.Parent)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if len(got) != len(tc.want) || got[0] != tc.want[0] || got[len(got)-1] != tc.want[len(tc.want)-1] {
			t.Errorf("walk: got %v, want %v", got, tc.want)
		}
	}
	// Filters see the class's keys.
	var n int
	if err := big.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil }, `parent=="layer"`); err != nil || n != 1 {
		t.Fatalf("filtered walk: %v, %d matches", err, n)
	}
	if info, err := huge.Stat(ctx, "k"); err != nil || info.Name != "k" || info.Parent != "layer" {
		t.Fatalf("stat in class: %+v, %v", info, err)
	}
	if _, err := s.Prepare(ctx, "@big/x", ""); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("class key on the default space: %v", err)
	}
	if err := huge.Remove(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := big.Stat(ctx, "k"); err != nil {
		t.Fatalf("removing huge's k touched big's: %v", err)
	}
	checkConsistent(t, s, pool)
}

func TestLayerSharing(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("pool")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) {
		c.Classes = []SizeClass{{Name: "big", Size: 1 << 30}}
	})
	var g grown
	g.hook(s)
	big, _ := s.Class("big")
	ref := func(chain string) snapshots.Opt {
		return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chain})
	}
	// unpack is what containerd's unpacker and metadata layer do for one
	// layer: Prepare with the chain id, on AlreadyExists find it by Walk.
	unpack := func(sn snapshots.Snapshotter, key, parent, chain string) (name string, shared bool) {
		t.Helper()
		_, err := sn.Prepare(ctx, key, parent, ref(chain))
		if errdefs.IsAlreadyExists(err) {
			filter := `labels."` + snapshots.LabelSnapshotRef + `"==` + chain + `,parent=="` + parent + `"`
			if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
				if i.Kind == snapshots.KindCommitted {
					name = i.Name
				}
				return nil
			}, filter); err != nil {
				t.Fatal(err)
			}
			if name == "" {
				t.Fatalf("AlreadyExists for %s but Walk finds no committed snapshot with parent %q", chain, parent)
			}
			return name, true
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := sn.Commit(ctx, "c-"+key, key, ref(chain)); err != nil {
			t.Fatal(err)
		}
		return "c-" + key, false
	}
	l1, shared1 := unpack(s, "default/1/extract-l1", "", "chain1")
	l2, shared2 := unpack(s, "default/2/extract-l2", l1, "chain2")
	if shared1 || shared2 || s.SharedLayers() != 0 {
		t.Fatal("first unpack shared a layer")
	}
	// Another containerd namespace, same space: containerd finds the
	// existing layer through Walk, nothing new is made.
	devs := len(pool.ids())
	k1, sh1 := unpack(s, "k8s.io/5/extract-l1", "", "chain1")
	k2, sh2 := unpack(s, "k8s.io/6/extract-l2", k1, "chain2")
	if !sh1 || !sh2 || k1 != l1 || k2 != l2 || len(pool.ids()) != devs || s.SharedLayers() != 2 {
		t.Fatalf("second namespace: %s %v %s %v, devices %d→%d, shared %d", k1, sh1, k2, sh2, devs, len(pool.ids()), s.SharedLayers())
	}
	// Another class: new committed snapshots on snapshots of the
	// layers' devices, no unpack.
	b1, bs1 := unpack(big, "default/1/extract-l1", "", "chain1")
	b2, bs2 := unpack(big, "default/2/extract-l2", b1, "chain2")
	if !bs1 || !bs2 || len(pool.ids()) != devs+2 || s.SharedLayers() != 4 {
		t.Fatalf("class: %v %v, devices %d→%d, shared %d", bs1, bs2, devs, len(pool.ids()), s.SharedLayers())
	}
	if info, err := big.Stat(ctx, b2); err != nil || info.Kind != snapshots.KindCommitted || info.Parent != b1 {
		t.Fatalf("shared layer in class: %+v, %v", info, err)
	}
	// Its container gets the class size on top of the shared layer.
	if _, err := big.Prepare(ctx, "ctr", b2); err != nil || sizeOf(t, s, "@big/ctr") != 1<<30 {
		t.Fatalf("container on a shared layer: %v", err)
	}
	// The shared layers stand alone: removing the originals keeps them.
	if err := big.Remove(ctx, "ctr"); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{l2, l1} {
		if err := s.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := big.View(ctx, "v", b2); err != nil {
		t.Fatalf("view of a shared layer after its origin went: %v", err)
	}
	checkConsistent(t, s, pool)
}
