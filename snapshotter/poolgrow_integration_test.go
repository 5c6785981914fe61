package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

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
	t.Cleanup(func() {
		if err := destroy(root); err != nil {
			t.Error(err)
		}
	})
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
			tooks = append(tooks, time.Duration(s.autogrow.took.Load()))
		}
	}
	files, err := s.autogrow.lp.Files()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d MiB; pool grew %d times to %d MiB (data file allocated %d MiB); steps took %v",
		written/mib, s.Growths(), files.DataSize>>20, files.DataAllocated>>20, tooks)
	if s.Growths() != 2 {
		t.Errorf("%d growths from 256 to 512 MiB by 128 MiB", s.Growths())
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
	_, err = s.Prepare(ctx, "b", "")
	if !errdefs.IsResourceExhausted(err) {
		t.Errorf("prepare at max_data_size: %v, want ResourceExhausted", err)
	}
	if s.Growths() != 2 {
		t.Errorf("%d growths after the cap", s.Growths())
	}
}
