//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// growPoll is how often the grower looks at the pool when no event came:
// the fallback for a missed or unsupported DM_DEV_WAIT.
const growPoll = 30 * time.Second

// growMetaBelow is the share of free metadata space (percent) under which
// the metadata file doubles.
const growMetaBelow = 25

// grower grows the embedded pool (MaxDataSize): when the pool's free data
// space falls under lowWater, or its free metadata under growMetaBelow (or
// MinFreeMetadata) percent, the backing files are extended and the pool
// reloaded. The growth watcher (watchGrowth) and a Prepare short of space
// (checkPoolHealth) both grow it, one at a time (mu).
type grower struct {
	lp *dmsetup.LoopPool
	c  *dmsetup.Client

	mu      sync.Mutex // one grow at a time
	lastWhy string     // what held the last step back, logged once
	steps   atomic.Uint64
	took    atomic.Int64 // nanoseconds the last step took
}

// Growths is how many times the embedded pool grew since start.
func (s *Snapshotter) Growths() uint64 {
	if s.autogrow == nil {
		return 0
	}
	return s.autogrow.steps.Load()
}

// growPlan decides the new sizes of the pool's files: data by one step
// when less than lowWater is free, never past maxData, and never promising
// the pool more unbacked space than the host has free beyond reserve;
// metadata doubled, up to MaxMetadataSize, when under growMetaBelow percent
// is free. Sizes unchanged mean nothing to do; why says what held back.
func growPlan(cfg *Config, st dmsetup.PoolStatus, blockBytes uint64, f dmsetup.LoopPoolFiles, hostFree uint64) (data, meta uint64, why string) {
	data, meta = f.DataSize, f.MetadataSize
	free := (st.TotalDataBlocks - min(st.UsedDataBlocks, st.TotalDataBlocks)) * blockBytes
	if free < cfg.lowWater(st.TotalDataBlocks*blockBytes) {
		switch want := min(f.DataSize+cfg.GrowStep, cfg.MaxDataSize); {
		case want <= f.DataSize:
			why = fmt.Sprintf("data at max_data_size %d", cfg.MaxDataSize)
		case hostFree+f.DataAllocated < cfg.GrowHostReserve+f.DataSize+blockBytes:
			why = fmt.Sprintf("host has %d bytes free, keeping %d in reserve", hostFree, cfg.GrowHostReserve)
		default:
			// What the file may promise beyond what it holds.
			hostCap := hostFree + f.DataAllocated - cfg.GrowHostReserve
			data = min(want, hostCap) / blockBytes * blockBytes
			if data <= f.DataSize {
				data, why = f.DataSize, fmt.Sprintf("host has %d bytes free, keeping %d in reserve", hostFree, cfg.GrowHostReserve)
			}
		}
	}
	if mf, ok := freePercent(st.UsedMetaBlocks, st.TotalMetaBlocks); ok && mf < max(growMetaBelow, cfg.MinFreeMetadata) && f.MetadataSize < MaxMetadataSize {
		meta = min(2*f.MetadataSize, MaxMetadataSize)
	}
	return data, meta, why
}

// lowWater is the free data space (bytes) under which a pool of size
// bytes grows: one GrowStep, or more when MinFreeData asks Prepare for more
// room, so Prepare never fails for want of a growth that is not coming.
func (c *Config) lowWater(size uint64) uint64 {
	return max(c.GrowStep, uint64(float64(size)*c.MinFreeData/100)+c.BlockSize)
}

// lowWaterBlocks is lowWater in pool blocks, for the pool table: the kernel
// raises an event when free space falls under it.
func (c *Config) lowWaterBlocks(size uint64) uint64 { return c.lowWater(size) / c.BlockSize }

// maybeGrow grows the pool if growPlan says so; it reports whether it did.
func (s *Snapshotter) maybeGrow(ctx context.Context) (bool, error) {
	g := s.autogrow
	g.mu.Lock()
	defer g.mu.Unlock()
	st, err := s.pool.Status()
	if err != nil {
		return false, err
	}
	f, err := g.lp.Files()
	if err != nil {
		return false, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(g.lp.DataFile), &fs); err != nil {
		return false, fmt.Errorf("statfs %s: %w", filepath.Dir(g.lp.DataFile), err)
	}
	blockBytes := dmsetup.Sectors(g.lp.BlockSizeSectors).Bytes()
	data, meta, why := growPlan(&s.cfg, st, blockBytes, f, fs.Bavail*uint64(fs.Bsize))
	l := log.G(ctx).WithField("pool", g.lp.Name)
	if data == f.DataSize && meta == f.MetadataSize {
		if why != "" && why != g.lastWhy {
			l.WithField("used_blocks", st.UsedDataBlocks).WithField("total_blocks", st.TotalDataBlocks).Warnf("pool is low on data space but cannot grow: %s", why)
		}
		g.lastWhy = why
		return false, nil
	}
	// The reload runs without poolMu: pool messages do not depend on the
	// pool's size, and the pool's suspend only makes I/O (and a snapshot's
	// suspend of its origin) wait for the resume. Holding poolMu would
	// stall every call for the whole growth instead.
	start := time.Now()
	err = g.lp.Grow(ctx, dmsetup.GrowOptions{DataSize: data, MetadataSize: meta, LowWaterMark: s.cfg.lowWaterBlocks(data)})
	if err != nil {
		return false, fmt.Errorf("growing the embedded pool: %w", err)
	}
	g.lastWhy = ""
	g.took.Store(int64(time.Since(start)))
	n := g.steps.Add(1)
	l.WithField("data_bytes", fmt.Sprintf("%d→%d", f.DataSize, data)).
		WithField("metadata_bytes", fmt.Sprintf("%d→%d", f.MetadataSize, meta)).
		WithField("took", time.Since(start)).WithField("step", n).Info("embedded pool grown")
	return true, nil
}

// watchGrowth grows the pool whenever it signals an event (DM_DEV_WAIT: the
// low water mark or the metadata threshold crossed), and every growPoll
// anyway, until ctx ends. It runs in its own goroutine (startBackground).
func (s *Snapshotter) watchGrowth(ctx context.Context) {
	name := s.pool.Name()
	for ctx.Err() == nil {
		info, err := s.pool.Info(name)
		if err == nil {
			if _, err = s.maybeGrow(ctx); err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("embedded pool growth")
			}
			wctx, cancel := context.WithTimeout(ctx, growPoll)
			_, err = s.autogrow.c.WaitEvent(wctx, name, info.EventNr)
			cancel()
			if err == nil || errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
				continue
			}
		}
		log.G(ctx).WithError(err).Debug("waiting for pool events; polling instead")
		select {
		case <-ctx.Done():
		case <-time.After(growPoll):
		}
	}
}
