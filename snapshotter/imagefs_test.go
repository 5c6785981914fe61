package snapshotter

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

func TestImageFSAvailable(t *testing.T) {
	const bs = 64 << 10
	for _, tc := range []struct {
		name              string
		total, used, want uint64
		minFree           float64
	}{
		{"empty, no threshold", 100 * bs, 0, 100 * bs, 0},
		{"half used, no threshold", 100 * bs, 50 * bs, 50 * bs, 0},
		{"half used, 5%", 100 * bs, 50 * bs, 45 * bs, 5},
		{"at the threshold", 100 * bs, 95 * bs, 0, 5},
		{"past the threshold", 100 * bs, 99 * bs, 0, 5},
		{"full", 100 * bs, 100 * bs, 0, 5},
		{"used beyond total", 100 * bs, 120 * bs, 0, 0},
		// 5% of 30 blocks is 1.5: two are kept, as Prepare keeps them.
		{"threshold not a whole block", 30 * bs, 10 * bs, 18 * bs, 5},
		{"no block size", 100, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blockSize := uint64(bs)
			if tc.name == "no block size" {
				blockSize = 0
			}
			if got := imageFSAvailable(tc.total, tc.used, blockSize, tc.minFree); got != tc.want {
				t.Errorf("imageFSAvailable(%d, %d, %d, %v) = %d, want %d", tc.total, tc.used, blockSize, tc.minFree, got, tc.want)
			}
		})
	}
}

// The kubelet's available space reaches 0 no later than Prepare is refused,
// and is not 0 while Prepare still has room beyond the threshold.
func TestImageFSAvailableMatchesPoolHealth(t *testing.T) {
	for _, total := range []uint64{20, 30, 97, 100, 1000} {
		for _, minFree := range []float64{0, 1, 5, 12.5, 33.3} {
			for used := uint64(0); used <= total; used++ {
				st := dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, UsedDataBlocks: used, TotalDataBlocks: total}
				refused := errdefs.IsResourceExhausted(poolHealth("tp", st, minFree, 0))
				avail := imageFSAvailable(total, used, 1, minFree)
				if refused && avail > 0 {
					t.Errorf("total %d, used %d, min_free %v: Prepare refused while the kubelet sees %d available", total, used, minFree, avail)
				}
				if !refused && avail == 0 && used < total && keptFree(total, minFree) < total-used {
					t.Errorf("total %d, used %d, min_free %v: the kubelet sees nothing available while Prepare has room", total, used, minFree)
				}
			}
		}
	}
}

// fakeMirror records what the snapshotter sets.
type fakeMirror struct {
	mu        sync.Mutex
	size      uint64
	available uint64
	sets      int
	err       error
}

func (m *fakeMirror) Set(_ context.Context, size, available uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return m.err
	}
	m.size, m.available = size, available
	m.sets++
	return nil
}

func (m *fakeMirror) get() (size, available uint64, sets int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.size, m.available, m.sets
}

func (m *fakeMirror) fail(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.err = err
}

// newWithMirror is newFake with the image filesystem mirror on, open being
// the mirror's opener and a 10 ms poll.
func newWithMirror(t *testing.T, pool *fakePool, open func(context.Context, string, uint64) (imageFSMirror, string, error)) *Snapshotter {
	t.Helper()
	ctx := context.Background()
	root := t.TempDir()
	db, err := storage.Open(ctx, filepath.Join(root, dbFile), storage.WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	s := newSnapshotter(Config{Root: root, BaseSize: 64 << 20, MinFreeData: 5, ImageFSMirror: true}, db, pool,
		func(context.Context, string) error { return nil })
	s.imagefs.open, s.imagefs.poll = open, 10*time.Millisecond
	if err := s.setUp(ctx); err != nil {
		db.Close()
		t.Fatal(err)
	}
	s.startBackground(ctx)
	t.Cleanup(func() { s.Close() })
	return s
}

// waitMirror waits until m holds size and available.
func waitMirror(t *testing.T, m *fakeMirror, size, available uint64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		gs, ga, _ := m.get()
		if gs == size && ga == available {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("mirror holds %d, %d available; want %d, %d", gs, ga, size, available)
		}
	}
}

// The mirror gets the pool's numbers before New returns, then follows the
// pool; a failing update shows in Status until one succeeds again.
func TestImageFSMirrorFollowsPool(t *testing.T) {
	const bs = DefaultBlockSize
	pool := newFakePool("tp")
	pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, UsedDataBlocks: 100, TotalDataBlocks: 1000, TotalMetaBlocks: 100}
	m := &fakeMirror{}
	var opened uint64
	s := newWithMirror(t, pool, func(_ context.Context, root string, size uint64) (imageFSMirror, string, error) {
		opened = size
		return m, "/dev/loop7", nil
	})
	if opened != 1000*bs {
		t.Errorf("mirror opened at %d bytes, want the pool's %d", opened, 1000*bs)
	}
	// Set at once, not a poll later: 1000-100 free, 50 kept.
	if size, avail, sets := m.get(); sets == 0 || size != 1000*bs || avail != 850*bs {
		t.Errorf("after New the mirror holds %d, %d available (%d sets); want %d, %d", size, avail, sets, 1000*bs, 850*bs)
	}

	pool.mu.Lock()
	pool.status.UsedDataBlocks, pool.status.TotalDataBlocks = 500, 2000
	pool.mu.Unlock()
	waitMirror(t, m, 2000*bs, 1400*bs)

	st, err := s.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if f := st.ImageFS; !f.Mirrored || f.Device != "/dev/loop7" || f.Error != "" || f.Dir != imagefs.Dir(s.cfg.Root) {
		t.Errorf("Status().ImageFS = %+v", f)
	}

	m.fail(errors.New("resize2fs failed"))
	waitStatusError(t, s, "resize2fs failed")
	m.fail(nil)
	pool.mu.Lock()
	pool.status.UsedDataBlocks = 600
	pool.mu.Unlock()
	waitMirror(t, m, 2000*bs, 1300*bs)
	waitStatusError(t, s, "")
}

func waitStatusError(t *testing.T, s *Snapshotter, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		st, err := s.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if want == "" && st.ImageFS.Error == "" || want != "" && strings.Contains(st.ImageFS.Error, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status().ImageFS.Error = %q, want %q", st.ImageFS.Error, want)
		}
	}
}

// A mirror that cannot be set up fails nothing else: Status says why, the
// directory is there for containerd, and snapshots are made.
func TestImageFSMirrorFailureIsNotFatal(t *testing.T) {
	pool := newFakePool("tp")
	pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, TotalDataBlocks: 1000, TotalMetaBlocks: 100}
	s := newWithMirror(t, pool, func(context.Context, string, uint64) (imageFSMirror, string, error) {
		return nil, "", errors.New("no loop device")
	})
	st, err := s.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if f := st.ImageFS; f.Mirrored || !strings.Contains(f.Error, "no loop device") || f.Capacity == 0 {
		t.Errorf("Status().ImageFS = %+v", f)
	}
	if fi, err := os.Stat(imagefs.Dir(s.cfg.Root)); err != nil || !fi.IsDir() {
		t.Errorf("the image filesystem directory: %v", err)
	}
	if _, err := s.Prepare(context.Background(), "a", ""); err != nil {
		t.Errorf("Prepare without the mirror: %v", err)
	}
}

// Off, the directory is plain and Status shows what holds it.
func TestImageFSMirrorOff(t *testing.T) {
	pool := newFakePool("tp")
	pool.status = dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW, TotalDataBlocks: 1000, TotalMetaBlocks: 100}
	s := mustNew(t, t.TempDir(), pool)
	st, err := s.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want, err := imagefs.StatDir(s.cfg.Root)
	if err != nil {
		t.Fatal(err)
	}
	if f := st.ImageFS; f.Mirrored || f.Error != "" || f.Device != "" || f.Major != want.Major || f.Minor != want.Minor || f.Capacity != want.Capacity {
		t.Errorf("Status().ImageFS = %+v, want the root's filesystem %+v", f, want)
	}
}
