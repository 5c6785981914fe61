package snapshotter

import (
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

func TestGrowPlan(t *testing.T) {
	const (
		block = 64 << 10
		gib   = 1 << 30
		big   = 1 << 50
	)
	blocks := func(bytes uint64) uint64 { return bytes / block }
	cfg := Config{Root: "/r", DataSize: gib, MaxDataSize: 4 * gib, GrowStep: gib}
	cfg.setDefaults()
	for _, tc := range []struct {
		name               string
		mod                func(*Config)
		st                 dmsetup.PoolStatus
		files              dmsetup.LoopPoolFiles
		hostFree           uint64
		wantData, wantMeta uint64
		why                string
	}{
		{name: "a step free",
			st:    dmsetup.PoolStatus{TotalDataBlocks: blocks(gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, MetadataSize: 16 << 20}, hostFree: big,
			wantData: gib, wantMeta: 16 << 20},
		{name: "under a step free",
			st:    dmsetup.PoolStatus{UsedDataBlocks: 1, TotalDataBlocks: blocks(gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, MetadataSize: 16 << 20}, hostFree: big,
			wantData: 2 * gib, wantMeta: 16 << 20},
		{name: "last step to the max",
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(3*gib + gib/2), TotalDataBlocks: blocks(3*gib + gib/2), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: 3*gib + gib/2, MetadataSize: 16 << 20}, hostFree: big,
			wantData: 4 * gib, wantMeta: 16 << 20},
		{name: "at the max",
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(4 * gib), TotalDataBlocks: blocks(4 * gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: 4 * gib, MetadataSize: 16 << 20}, hostFree: big,
			wantData: 4 * gib, wantMeta: 16 << 20, why: "max_data_size"},
		{name: "host reserve caps the step",
			// 1GiB allocated, 1.5GiB free on the host, 1GiB reserve: the
			// file may promise 1.5GiB.
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(gib), TotalDataBlocks: blocks(gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, DataAllocated: gib, MetadataSize: 16 << 20}, hostFree: gib + gib/2,
			wantData: gib + gib/2, wantMeta: 16 << 20},
		{name: "host reserve stops it",
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(gib), TotalDataBlocks: blocks(gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, DataAllocated: gib / 2, MetadataSize: 16 << 20}, hostFree: gib,
			wantData: gib, wantMeta: 16 << 20, why: "reserve"},
		{name: "metadata low",
			st:    dmsetup.PoolStatus{TotalDataBlocks: blocks(gib), UsedMetaBlocks: 80, TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, MetadataSize: 16 << 20}, hostFree: big,
			wantData: gib, wantMeta: 32 << 20},
		{name: "metadata at its max",
			st:    dmsetup.PoolStatus{TotalDataBlocks: blocks(gib), UsedMetaBlocks: 99, TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, MetadataSize: MaxMetadataSize}, hostFree: big,
			wantData: gib, wantMeta: MaxMetadataSize},
		{name: "min_free_data above a step",
			// 3GiB of 100GiB free is more than a step but under the 5%
			// Prepare needs.
			mod:   func(c *Config) { c.MinFreeData, c.MaxDataSize = 5, 200*gib },
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(97 * gib), TotalDataBlocks: blocks(100 * gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: 100 * gib, MetadataSize: 16 << 20}, hostFree: big,
			wantData: 101 * gib, wantMeta: 16 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			if tc.mod != nil {
				tc.mod(&c)
			}
			data, meta, why := growPlan(&c, tc.st, block, tc.files, tc.hostFree)
			if data != tc.wantData || meta != tc.wantMeta {
				t.Errorf("growPlan = %d, %d; want %d, %d", data, meta, tc.wantData, tc.wantMeta)
			}
			if (tc.why == "") != (why == "") || !strings.Contains(why, tc.why) {
				t.Errorf("why = %q, want %q", why, tc.why)
			}
		})
	}
}
