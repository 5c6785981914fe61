//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// The embedded pool grows itself up to MaxDataSize. While it can grow, a
// full pool holds writes back (queue_if_no_space) until the next step
// lands, so a fast writer never sees an error; the kernel's
// no_space_timeout (60 s by default) is the backstop. Once it cannot grow
// (at MaxDataSize, or the host's free space down to GrowHostReserve), a
// full pool fails writes at once (error_if_no_space), as an LVM pool does
// with --errorwhenfull. The grower keeps ahead of writers: it measures how
// fast the pool fills and how long a step takes, starts a step while the
// free space still covers the fill until the step lands, and makes the
// step large enough for growPlanSpan of writing.
const (
	// growPoll is how often the grower looks at an idle pool when no event
	// came: the fallback for a missed or unsupported event.
	growPoll = 30 * time.Second
	// activePoll is how often it looks at a pool that is filling.
	activePoll = time.Second
	// growMetaBelow is the share of free metadata space (percent) under
	// which the metadata file doubles.
	growMetaBelow = 25
	// growPlanSpan is how long one step should last at the current fill
	// rate.
	growPlanSpan = 30 * time.Second
	// rateHalfLife is how fast a measured fill rate is forgotten, and
	// rateSpan the least time a rate is measured over.
	rateHalfLife = 10 * time.Second
	rateSpan     = 500 * time.Millisecond
)

// grower grows the embedded pool (MaxDataSize): when the pool's free data
// space falls under its low water mark (growPlan), or its free metadata
// under growMetaBelow (or MinFreeMetadata) percent, the backing files are
// extended and the pool reloaded. The growth watcher (watchGrowth) and a
// Prepare short of space (checkPoolHealth) both grow it, one at a time
// (mu).
type grower struct {
	lp *dmsetup.LoopPool
	c  *dmsetup.Client

	mu         sync.Mutex // one grow at a time; guards the fields below
	lastWhy    string     // what held the last step back, logged once
	data, meta fillRate
	took       time.Duration // how long the last step took

	steps    atomic.Uint64
	canGrow  atomic.Bool // writes to a full pool wait (queue_if_no_space)
	lastTook atomic.Int64
}

// Growths is how many times the embedded pool grew since start.
func (s *Snapshotter) Growths() uint64 {
	if s.autogrow == nil {
		return 0
	}
	return s.autogrow.steps.Load()
}

// fillRate estimates how fast something fills, in bytes per second, from
// samples of how much is used: the fastest recent rate, halving every
// rateHalfLife.
type fillRate struct {
	at   time.Time
	used uint64
	rate float64
}

func (r *fillRate) sample(now time.Time, used uint64) {
	dt := now.Sub(r.at).Seconds()
	if !r.at.IsZero() && dt < rateSpan.Seconds() {
		// Too close to the last sample (the events of a growth come
		// in bursts): a few blocks in a millisecond are no rate.
		return
	}
	if !r.at.IsZero() {
		cur := 0.0
		if used > r.used {
			cur = float64(used-r.used) / dt
		}
		r.rate = max(cur, r.rate*math.Exp2(-dt/rateHalfLife.Seconds()))
	}
	r.at, r.used = now, used
}

// restart makes the next sample the base of the next rate; the rate
// measured so far stays until then.
func (r *fillRate) restart() { r.at = time.Time{} }

// growLead is what the grower knows of the pace: the fill rates of data
// and metadata (bytes per second) and how long the last step took.
type growLead struct {
	dataRate, metaRate float64
	took               time.Duration
}

// lead is how much time a step must start ahead of a full pool: the step
// itself, twice for safety, and the grower's polls.
func (l growLead) lead() time.Duration { return 2*l.took + 2*activePoll }

// lowWater is the free data space (bytes) under which a pool of size bytes
// grows: one GrowStep, or more when MinFreeData asks Prepare for more room
// (so Prepare never fails for want of a growth that is not coming), or what
// the pool fills at the current rate until a step lands.
func (c *Config) lowWater(size uint64, l growLead) uint64 {
	static := max(c.GrowStep, uint64(float64(size)*c.MinFreeData/100)+c.BlockSize)
	return max(static, uint64(l.dataRate*l.lead().Seconds()))
}

// lowWaterBlocks is lowWater in pool blocks, for the pool table: the kernel
// raises an event when free space falls under it.
func (c *Config) lowWaterBlocks(size uint64, l growLead) uint64 {
	return c.lowWater(size, l) / c.BlockSize
}

// dataHeadroom is the largest data file size growth may give the pool, and
// why it cannot grow at all ("" when it can): never past MaxDataSize, and
// never promising the pool more unbacked space than the host has free
// beyond GrowHostReserve.
func dataHeadroom(cfg *Config, f dmsetup.LoopPoolFiles, hostFree, blockBytes uint64) (uint64, string) {
	if f.DataSize >= cfg.MaxDataSize {
		return f.DataSize, fmt.Sprintf("data at max_data_size %d", cfg.MaxDataSize)
	}
	reserve := fmt.Sprintf("host has %d bytes free, keeping %d in reserve", hostFree, cfg.GrowHostReserve)
	if hostFree+f.DataAllocated < cfg.GrowHostReserve+f.DataSize+blockBytes {
		return f.DataSize, reserve
	}
	// What the file may promise beyond what it holds.
	hostCap := hostFree + f.DataAllocated - cfg.GrowHostReserve
	most := min(cfg.MaxDataSize, hostCap) / blockBytes * blockBytes
	if most <= f.DataSize {
		return f.DataSize, reserve
	}
	return most, ""
}

// growPlan decides the new sizes of the pool's files: data by a step
// (GrowStep, or growPlanSpan of writing at the current rate) when less
// than lowWater is free, within dataHeadroom; metadata doubled, up to
// MaxMetadataSize, when under growMetaBelow percent is free or the rest
// would fill before a step lands. Sizes unchanged mean nothing to do; why
// says what held back.
func growPlan(cfg *Config, st dmsetup.PoolStatus, blockBytes uint64, f dmsetup.LoopPoolFiles, hostFree uint64, l growLead) (data, meta uint64, why string) {
	data, meta = f.DataSize, f.MetadataSize
	free := (st.TotalDataBlocks - min(st.UsedDataBlocks, st.TotalDataBlocks)) * blockBytes
	if free < cfg.lowWater(st.TotalDataBlocks*blockBytes, l) {
		most, held := dataHeadroom(cfg, f, hostFree, blockBytes)
		step := max(cfg.GrowStep, uint64(l.dataRate*growPlanSpan.Seconds()))
		data, why = min(f.DataSize+step, most)/blockBytes*blockBytes, held
		if data <= f.DataSize {
			data = f.DataSize
		}
	}
	metaFree := (st.TotalMetaBlocks - min(st.UsedMetaBlocks, st.TotalMetaBlocks)) * MetadataBlockSize
	mf, ok := freePercent(st.UsedMetaBlocks, st.TotalMetaBlocks)
	short := ok && (mf < max(growMetaBelow, cfg.MinFreeMetadata) || float64(metaFree) < l.metaRate*l.lead().Seconds())
	if short && f.MetadataSize < MaxMetadataSize {
		meta = min(2*f.MetadataSize, MaxMetadataSize)
	}
	return data, meta, why
}

// maybeGrow grows the pool if growPlan says so, and sets what a full pool
// does with writes: wait while it can still grow, fail once it cannot. It
// reports whether it grew.
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
	hostFree := fs.Bavail * uint64(fs.Bsize)
	blockBytes := dmsetup.Sectors(g.lp.BlockSizeSectors).Bytes()
	now := time.Now()
	g.data.sample(now, st.UsedDataBlocks*blockBytes)
	g.meta.sample(now, st.UsedMetaBlocks*MetadataBlockSize)
	lead := growLead{dataRate: g.data.rate, metaRate: g.meta.rate, took: g.took}

	data, meta, why := growPlan(&s.cfg, st, blockBytes, f, hostFree, lead)
	l := log.G(ctx).WithField("pool", g.lp.Name)
	if why != "" && why != g.lastWhy {
		l.WithField("used_blocks", st.UsedDataBlocks).WithField("total_blocks", st.TotalDataBlocks).Warnf("pool is low on data space but cannot grow: %s", why)
	}
	g.lastWhy = why
	grown := false
	if data != f.DataSize || meta != f.MetadataSize {
		if err := g.grow(ctx, &s.cfg, f, data, meta, lead); err != nil {
			// A step that fails may fail again: writes must not wait
			// for it.
			return false, errors.Join(err, g.setCanGrow(ctx, st, false, err.Error()))
		}
		grown, f.DataSize = true, data
		// A resize changes what the kernel counts as used (it keeps a
		// tenth of the metadata, up to 16 MiB, in reserve): measure the
		// rates from here.
		g.data.restart()
		g.meta.restart()
	}
	_, held := dataHeadroom(&s.cfg, f, hostFree, blockBytes)
	return grown, g.setCanGrow(ctx, st, held == "", held)
}

// grow extends the pool's files to data and meta bytes. The reload runs
// without poolMu: pool messages do not depend on the pool's size, and the
// pool's suspend only makes I/O (and a snapshot's suspend of its origin)
// wait for the resume. Holding poolMu would stall every call for the whole
// growth instead. Called with g.mu held.
func (g *grower) grow(ctx context.Context, cfg *Config, f dmsetup.LoopPoolFiles, data, meta uint64, lead growLead) error {
	start := time.Now()
	err := g.lp.Grow(ctx, dmsetup.GrowOptions{DataSize: data, MetadataSize: meta, LowWaterMark: cfg.lowWaterBlocks(data, lead)})
	if err != nil {
		return fmt.Errorf("growing the embedded pool: %w", err)
	}
	g.took = time.Since(start)
	g.lastTook.Store(int64(g.took))
	n := g.steps.Add(1)
	log.G(ctx).WithField("pool", g.lp.Name).
		WithField("data_bytes", fmt.Sprintf("%d→%d", f.DataSize, data)).
		WithField("metadata_bytes", fmt.Sprintf("%d→%d", f.MetadataSize, meta)).
		WithField("fill_rate_bytes_per_second", int64(lead.dataRate)).
		WithField("metadata_fill_rate_bytes_per_second", int64(lead.metaRate)).
		WithField("took", g.took).WithField("step", n).Info("embedded pool grown")
	return nil
}

// setCanGrow makes a full pool hold writes back while it can grow, and
// fail them at once when it cannot (why says why), by a table reload when
// the pool's status st shows the other policy. Called with g.mu held.
func (g *grower) setCanGrow(ctx context.Context, st dmsetup.PoolStatus, can bool, why string) error {
	g.canGrow.Store(can)
	want := dmsetup.ErrorIfNoSpace
	if can {
		want = dmsetup.QueueIfNoSpace
	}
	if st.NoSpacePolicy == want {
		return nil
	}
	if err := g.lp.SetErrorIfNoSpace(!can); err != nil {
		return fmt.Errorf("setting %s on the embedded pool: %w", want, err)
	}
	l := log.G(ctx).WithField("pool", g.lp.Name).WithField("policy", want)
	if can {
		l.Info("the pool can grow: writes to it when full wait for the next step")
	} else {
		l.Warnf("the pool cannot grow (%s): writes to it when full fail at once", why)
	}
	return nil
}

// pollEvery is how long the watcher waits for a pool event before it looks
// anyway: a second while the pool fills, growPoll when it is idle.
func (g *grower) pollEvery() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	block := float64(dmsetup.Sectors(g.lp.BlockSizeSectors).Bytes())
	if g.data.rate*growPoll.Seconds() >= block || g.meta.rate*growPoll.Seconds() >= MetadataBlockSize {
		return activePoll
	}
	return growPoll
}

// watchGrowth grows the pool whenever it signals an event (the low water
// mark or the metadata threshold crossed, or the pool full), every second
// while it fills, and every growPoll anyway, until ctx ends. It runs in
// its own goroutine (startBackground).
func (s *Snapshotter) watchGrowth(ctx context.Context) {
	name := s.pool.Name()
	for ctx.Err() == nil {
		info, err := s.pool.Info(name)
		if err == nil {
			if _, err = s.maybeGrow(ctx); err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("embedded pool growth")
			}
			wctx, cancel := context.WithTimeout(ctx, s.autogrow.pollEvery())
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
