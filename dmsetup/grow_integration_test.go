//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// TestIntegrationWaitAndGrow: WaitEvent returns when cancelled and when
// the pool's event counter moves; Grow makes a running pool bigger.
func TestIntegrationWaitAndGrow(t *testing.T) {
	c := requireDM(t)
	p := newLoopPool(t, c)
	info, err := c.Info(p.Name)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	start := time.Now()
	_, err = c.WaitEvent(ctx, p.Name, info.EventNr)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 30*time.Second {
		t.Fatalf("wait without an event: %v after %s, want the deadline", err, time.Since(start))
	}

	st, err := c.PoolStatus(p.Name)
	if err != nil {
		t.Fatal(err)
	}
	files, err := p.Files()
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	// A low water mark above the free space: the pool signals when it
	// next allocates a block.
	if err := p.Grow(context.Background(), GrowOptions{DataSize: 2 * files.DataSize, MetadataSize: files.MetadataSize, LowWaterMark: 3 * st.TotalDataBlocks}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if info, err = c.Info(p.Name); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := c.WaitEvent(context.Background(), p.Name, info.EventNr)
		got <- err
	}()
	if err := c.CreateThin(p.Name, 1); err != nil {
		t.Fatal(err)
	}
	dev := activateThin(t, c, p, devName("thin"), 1)
	if err := os.WriteFile(dev, make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("no pool event after an allocation under the low water mark")
	}
	st2, err := c.PoolStatus(p.Name)
	if err != nil {
		t.Fatal(err)
	}
	if st2.TotalDataBlocks != 2*st.TotalDataBlocks {
		t.Errorf("pool has %d data blocks after growing, want %d", st2.TotalDataBlocks, 2*st.TotalDataBlocks)
	}
	t.Logf("grow from %d to %d blocks took %s", st.TotalDataBlocks, st2.TotalDataBlocks, took)
	if err := p.Grow(context.Background(), GrowOptions{DataSize: files.DataSize}); err == nil {
		t.Error("shrinking was accepted")
	}
}
