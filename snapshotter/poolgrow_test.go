package snapshotter

import (
	"strings"
	"testing"
	"time"

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
		lead               growLead
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
		{name: "a fast writer starts a step early, and a larger one",
			// 1.5GiB free is more than a step, but at 400MiB/s and 1s a
			// step the pool fills before a step lands: grow by 30s of
			// writing.
			mod:   func(c *Config) { c.MaxDataSize = 100 * gib },
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(2*gib + gib/2), TotalDataBlocks: blocks(4 * gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: 4 * gib, MetadataSize: 16 << 20}, hostFree: big,
			lead:     growLead{dataRate: 400 << 20, took: time.Second},
			wantData: 4*gib + 30*(400<<20), wantMeta: 16 << 20},
		{name: "a slow writer waits for the static mark",
			mod:   func(c *Config) { c.MaxDataSize = 100 * gib },
			st:    dmsetup.PoolStatus{UsedDataBlocks: blocks(2*gib + gib/2), TotalDataBlocks: blocks(4 * gib), TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: 4 * gib, MetadataSize: 16 << 20}, hostFree: big,
			lead:     growLead{dataRate: 1 << 20, took: time.Second},
			wantData: 4 * gib, wantMeta: 16 << 20},
		{name: "metadata filling fast doubles early",
			// Half free, but 1MiB/s fills the 50 free blocks (200KiB)
			// before a step lands.
			st:    dmsetup.PoolStatus{TotalDataBlocks: blocks(gib), UsedMetaBlocks: 50, TotalMetaBlocks: 100},
			files: dmsetup.LoopPoolFiles{DataSize: gib, MetadataSize: 16 << 20}, hostFree: big,
			lead:     growLead{metaRate: 1 << 20, took: time.Second},
			wantData: gib, wantMeta: 32 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			if tc.mod != nil {
				tc.mod(&c)
			}
			data, meta, why := growPlan(&c, tc.st, block, tc.files, tc.hostFree, tc.lead)
			if data != tc.wantData || meta != tc.wantMeta {
				t.Errorf("growPlan = %d, %d; want %d, %d", data, meta, tc.wantData, tc.wantMeta)
			}
			if (tc.why == "") != (why == "") || !strings.Contains(why, tc.why) {
				t.Errorf("why = %q, want %q", why, tc.why)
			}
		})
	}
}

// TestFillRate: the rate is the fastest recent one and fades when the pool
// stops filling.
func TestFillRate(t *testing.T) {
	var r fillRate
	t0 := time.Unix(1000, 0)
	r.sample(t0, 0)
	if r.rate != 0 {
		t.Fatalf("rate after one sample %v", r.rate)
	}
	r.sample(t0.Add(time.Second), 100<<20)
	if r.rate != 100<<20 {
		t.Fatalf("rate %v, want 100MiB/s", r.rate)
	}
	// A slower second keeps the faster rate, faded a little.
	r.sample(t0.Add(2*time.Second), 110<<20)
	if r.rate < 90<<20 || r.rate >= 100<<20 {
		t.Errorf("rate after a slow second %v", r.rate)
	}
	// Idle for a minute: mostly forgotten.
	r.sample(t0.Add(62*time.Second), 110<<20)
	if r.rate > 2<<20 {
		t.Errorf("rate after a minute idle %v", r.rate)
	}
	// Freed space is no fill.
	r.sample(t0.Add(63*time.Second), 0)
	if r.rate > 2<<20 {
		t.Errorf("rate after space freed %v", r.rate)
	}
	// A sample a millisecond later does not count: 64KiB in 1ms is no
	// 64MB/s writer.
	r.sample(t0.Add(63*time.Second+time.Millisecond), 64<<10)
	if r.rate > 2<<20 {
		t.Errorf("rate from a sample 1ms apart %v", r.rate)
	}
}
