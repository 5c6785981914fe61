//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"os/exec"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
)

// TestIntegrationMetadataThinIDs reads the thin ids of a running pool from a
// metadata snapshot, with each tool installed, and checks the snapshot is
// released every time.
func TestIntegrationMetadataThinIDs(t *testing.T) {
	c := requireDM(t)
	ctx := context.Background()
	pool := newLoopPool(t, c)
	for _, id := range []uint32{5, 1, 9} {
		if err := c.CreateThin(pool.Name, id); err != nil {
			t.Fatal(err)
		}
	}
	name := devName("thin")
	activateThin(t, c, pool, name, 5)
	tp, length, err := c.ThinTarget(name)
	if err != nil || tp.ID != 5 || length != thinSectors {
		t.Fatalf("ThinTarget(%s) = %+v, %d, %v; want id 5, %d sectors", name, tp, length, err, thinSectors)
	}
	if _, _, err := c.ThinTarget(pool.Name); !errors.Is(err, ErrMalformed) {
		t.Fatalf("ThinTarget of the pool itself: %v, want ErrMalformed", err)
	}
	pp, plen, err := c.PoolTarget(pool.Name)
	if err != nil || plen != pool.DataSectors || pp.BlockSizeSectors != pool.BlockSizeSectors || pp.MetadataDev == "" {
		t.Fatalf("PoolTarget(%s) = %+v, %d, %v; want %d sectors", pool.Name, pp, plen, err, pool.DataSectors)
	}
	if _, _, err := c.PoolTarget(name); !errors.Is(err, ErrMalformed) {
		t.Fatalf("PoolTarget of a thin device: %v, want ErrMalformed", err)
	}
	if _, err := c.MetadataThinIDs(ctx, name); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("MetadataThinIDs of a thin device: %v, want InvalidArgument", err)
	}

	tools := 0
	for i, tool := range metadataTools {
		if _, err := exec.LookPath(tool.bin); err != nil {
			t.Logf("%s not installed", tool.bin)
			continue
		}
		tools++
		t.Run(tool.bin, func(t *testing.T) {
			// Only this tool is tried.
			saved := metadataTools
			metadataTools = slices.Clone(saved[i : i+1])
			t.Cleanup(func() { metadataTools = saved })
			for range 2 { // a second read proves the snapshot was released
				ids, err := c.MetadataThinIDs(ctx, pool.Name)
				if err != nil || !slices.Equal(ids, []uint32{1, 5, 9}) {
					t.Fatalf("MetadataThinIDs = %v, %v; want [1 5 9]", ids, err)
				}
				st, err := c.PoolStatus(pool.Name)
				if err != nil || st.HasHeldRoot {
					t.Fatalf("metadata snapshot still held after the read: %+v, %v", st, err)
				}
			}
		})
	}
	if tools == 0 {
		t.Fatal("neither thin_ls nor thin_dump installed: install thin-provisioning-tools")
	}
	if _, err := c.MetadataThinIDs(ctx, name); err == nil {
		t.Fatal("MetadataThinIDs of a thin device succeeded")
	}
}
