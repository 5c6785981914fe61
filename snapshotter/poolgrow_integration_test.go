package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// TestIntegrationGrow fills a snapshot's filesystem well past the embedded
// pool's first size: the pool grows step by step (on the kernel's low water
// event) and every write succeeds; at max_data_size it stops growing and
// Prepare fails with ResourceExhausted.
func TestIntegrationGrow(t *testing.T) {
	dmtest.Require(t)
	const (
		mib   = 1 << 20
		chunk = 16 * mib
	)
	ctx := context.Background()
	root := t.TempDir()
	cfg := Config{Root: root, DataSize: 256 * mib, MaxDataSize: 512 * mib, GrowStep: 128 * mib,
		BaseSize: 1 << 30, MinFreeData: 5, GrowHostReserve: 64 * mib}
	s := newEmbedded(t, cfg)
	if s.autogrow == nil {
		t.Fatal("no grower on the embedded pool with max_data_size set")
	}
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := mount.UnmountAll(mnt, 0); err != nil {
			t.Error(err)
		}
	}()
	data := bytes.Repeat([]byte{0xa5}, chunk)
	freePct := func() float64 {
		st, err := s.pool.Status()
		if err != nil {
			t.Fatal(err)
		}
		f, _ := freePercent(st.UsedDataBlocks, st.TotalDataBlocks)
		return f
	}
	written := 0
	var tooks []time.Duration
	for i := 0; ; i++ {
		files, err := s.autogrow.lp.Files()
		if err != nil {
			t.Fatal(err)
		}
		if files.DataSize == cfg.MaxDataSize && freePct() < cfg.MinFreeData {
			break
		}
		if i == 64 {
			t.Fatalf("wrote %d MiB and the pool is at %d bytes with %.1f%% free", written/mib, files.DataSize, freePct())
		}
		before := s.Growths()
		p := filepath.Join(mnt, fmt.Sprint(i))
		f, err := os.Create(p)
		if err == nil {
			_, err = f.Write(data)
			if err == nil {
				err = f.Sync()
			}
			err = errors.Join(err, f.Close())
		}
		if err != nil {
			t.Fatalf("write %d (after %d MiB, pool %d bytes, %d growths): %v", i, written/mib, files.DataSize, s.Growths(), err)
		}
		written += chunk
		// The event comes asynchronously; give the grower a moment.
		for range 50 {
			if s.Growths() != before || freePct() >= 100*float64(cfg.GrowStep)/float64(files.DataSize) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if s.Growths() != before {
			tooks = append(tooks, time.Duration(s.autogrow.lastTook.Load()))
		}
	}
	files, err := s.autogrow.lp.Files()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d MiB; pool grew %d times to %d MiB (data file allocated %d MiB); steps took %v",
		written/mib, s.Growths(), files.DataSize>>20, files.DataAllocated>>20, tooks)
	// A step is at least 128 MiB, more when the pool fills fast.
	if s.Growths() < 1 || s.Growths() > 2 || files.DataSize != cfg.MaxDataSize {
		t.Errorf("%d growths from 256 to %d MiB by at least 128 MiB", s.Growths(), files.DataSize>>20)
	}
	if written <= int(cfg.DataSize) {
		t.Errorf("wrote only %d bytes: the first size would have held them", written)
	}
	// Everything written is there.
	for i := 0; i < written/chunk; i++ {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprint(i)))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("file %d: %v, %d bytes, same content %v", i, err, len(got), bytes.Equal(got, data))
		}
	}
	// At the cap: no growth, Prepare refused.
	growths := s.Growths()
	_, err = s.Prepare(ctx, "b", "")
	if !errdefs.IsResourceExhausted(err) {
		t.Errorf("prepare at max_data_size: %v, want ResourceExhausted", err)
	}
	if n := s.Growths(); n != growths {
		t.Errorf("%d growths after the cap, %d before", n, growths)
	}
}

// TestIntegrationGrowFastWriter writes at full speed (O_DIRECT, 4 MiB a
// write) into a small embedded pool that grows itself, on the real kernel:
//   - while the pool can grow, a write that finds it full waits instead of
//     failing: with the grower stopped the writer blocks on a full pool,
//     and finishes without an error once a step lands;
//   - with the grower running, hundreds of MiB go through without an
//     error, the data and the metadata file grow (min_free_metadata 85
//     makes the metadata grow once the writes use a few percent of it:
//     the kernel counts a tenth of it as used, its reserve);
//   - at max_data_size the pool fails writes at once: the writer gets EIO
//     or ENOSPC within seconds, not after the kernel's 60 s queue timeout.
func TestIntegrationGrowFastWriter(t *testing.T) {
	dmtest.Require(t)
	const mib = 1 << 20
	ctx := context.Background()
	root := t.TempDir()
	cfg := Config{Root: root, DataSize: 192 * mib, MaxDataSize: 768 * mib, GrowStep: 64 * mib, MetadataSize: 2 * mib,
		BaseSize: 1 << 30, MinFreeMetadata: 85, GrowHostReserve: 64 * mib}
	s := newEmbedded(t, cfg)
	whenFull := func() string {
		st, err := s.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.WhenFull
	}
	if w := whenFull(); w != WhenFullQueue {
		t.Fatalf("a pool that can grow: when full %q, want %q", w, WhenFullQueue)
	}
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := mount.UnmountAll(mnt, 0); err != nil {
			t.Error(err)
		}
	}()
	w, err := newDirectWriter(filepath.Join(mnt, "fill"), 4*mib)
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()

	// 1. No grower: the writer fills the pool and then waits.
	s.stopBackground()
	done := make(chan error, 1)
	var stop atomic.Bool
	go func() {
		for !stop.Load() {
			if err := w.write(); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	full := waitFor(t, 2*time.Minute, func() bool {
		st, err := s.pool.Status()
		return err == nil && st.Mode == dmsetup.PoolModeOutOfDataSpace
	})
	if !full {
		t.Fatalf("the pool never filled (%d MiB written)", w.written/mib)
	}
	select {
	case err := <-done:
		t.Fatalf("the writer returned on a full pool that can grow: %v", err)
	case <-time.After(3 * time.Second):
	}
	stop.Store(true) // after the write the pool holds back
	if _, err := s.maybeGrow(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("a write held back by the full pool failed after it grew: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the writer did not go on after the pool grew")
	}
	t.Logf("held back on a full pool, went on after a step: %d MiB written", w.written/mib)

	// 2. With the grower: full speed, no error.
	s.startBackground(ctx)
	before, start := w.written, time.Now()
	for w.written < before+256*mib {
		if err := w.write(); err != nil {
			t.Fatalf("write failed while the pool may grow (after %d MiB, %d growths): %v", w.written/mib, s.Growths(), err)
		}
	}
	files, err := s.autogrow.lp.Files()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d MiB at %.0f MiB/s with the grower; %d growths, data file %d MiB, metadata file %d MiB",
		(w.written-before)/mib, float64(w.written-before)/mib/time.Since(start).Seconds(), s.Growths(), files.DataSize/mib, files.MetadataSize/mib)
	if files.MetadataSize <= cfg.MetadataSize {
		t.Errorf("metadata file %d bytes: it never grew", files.MetadataSize)
	}

	// 3. Up to the cap, then every write fails at once.
	var failed error
	var took time.Duration
	for failed == nil {
		start := time.Now()
		failed = w.write()
		took = time.Since(start)
		if w.written > 2*cfg.MaxDataSize {
			t.Fatalf("wrote %d MiB into a pool capped at %d MiB", w.written/mib, cfg.MaxDataSize/mib)
		}
	}
	if !errors.Is(failed, unix.EIO) && !errors.Is(failed, unix.ENOSPC) {
		t.Errorf("write at the cap: %v, want EIO or ENOSPC", failed)
	}
	if took > 30*time.Second {
		t.Errorf("the failing write took %v: it waited for a growth that could not come", took)
	}
	files, err = s.autogrow.lp.Files()
	if err != nil {
		t.Fatal(err)
	}
	if files.DataSize != cfg.MaxDataSize {
		t.Errorf("data file %d bytes at the cap, want %d", files.DataSize, cfg.MaxDataSize)
	}
	if w := whenFull(); w != WhenFullError {
		t.Errorf("a pool at its cap: when full %q, want %q", w, WhenFullError)
	}
	t.Logf("at the cap after %d MiB: %v in %v", w.written/mib, failed, took)
}

// directWriter appends to a file with O_DIRECT writes of one size, so each
// write reaches the pool before it returns.
type directWriter struct {
	fd      int
	buf     []byte
	written uint64
}

func newDirectWriter(path string, size int) (*directWriter, error) {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_DIRECT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	// mmap'd memory is page aligned, as O_DIRECT wants.
	buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	return &directWriter{fd: fd, buf: buf}, nil
}

func (w *directWriter) write() error {
	n, err := unix.Pwrite(w.fd, w.buf, int64(w.written))
	w.written += uint64(max(n, 0))
	if err == nil && n != len(w.buf) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(w.buf))
	}
	return err
}

func (w *directWriter) close() {
	_ = unix.Munmap(w.buf)
	_ = unix.Close(w.fd)
}

// waitFor polls cond every 100 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, cond func() bool) bool {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}
