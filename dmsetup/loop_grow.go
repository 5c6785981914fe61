//go:build linux

package dmsetup

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// refreshLoopCapacity makes loop device path take the current size of its
// backing file (LOOP_SET_CAPACITY), e.g. after the file grew.
func refreshLoopCapacity(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return &os.PathError{Op: "LOOP_SET_CAPACITY", Path: path, Err: err}
	}
	return nil
}

// LoopPoolFiles are the sizes of a loop pool's files, in bytes, and the
// bytes the data file really occupies on the host (it is sparse).
type LoopPoolFiles struct {
	DataSize, MetadataSize uint64
	DataAllocated          uint64
}

// Files returns the current sizes of the pool's files.
func (p *LoopPool) Files() (LoopPoolFiles, error) {
	var out LoopPoolFiles
	var st unix.Stat_t
	if err := unix.Stat(p.DataFile, &st); err != nil {
		return out, &os.PathError{Op: "stat", Path: p.DataFile, Err: err}
	}
	out.DataSize, out.DataAllocated = uint64(st.Size), uint64(st.Blocks)*512
	meta, err := fileSize(p.MetadataFile)
	out.MetadataSize = meta
	return out, err
}

// GrowOptions are the sizes LoopPool.Grow gives the pool. DataSize must be
// given (the current size keeps it); a zero MetadataSize or LowWaterMark
// keeps the current value.
type GrowOptions struct {
	// DataSize and MetadataSize are the new sizes of the files in bytes;
	// files are never shrunk.
	DataSize, MetadataSize uint64
	// LowWaterMark is the pool's new low water mark in data blocks.
	LowWaterMark uint64
}

// Grow makes the running pool bigger: the sparse files are extended, their
// loop devices take the new sizes, and the pool's table is reloaded with
// the new data length (suspend and resume; the pool resizes its data and
// metadata space on resume). I/O to the pool's thin devices waits while the
// pool is suspended.
func (p *LoopPool) Grow(ctx context.Context, opts GrowOptions) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if p.DataLoop == "" || p.MetadataLoop == "" {
		return fmt.Errorf("loop pool %s: loop devices unknown: %w", p.Name, errdefs.ErrFailedPrecondition)
	}
	cur, err := p.Files()
	if err != nil {
		return err
	}
	if opts.DataSize < cur.DataSize || opts.MetadataSize != 0 && opts.MetadataSize < cur.MetadataSize {
		return fmt.Errorf("loop pool %s: cannot shrink (data %d → %d, metadata %d → %d bytes): %w",
			p.Name, cur.DataSize, opts.DataSize, cur.MetadataSize, opts.MetadataSize, errdefs.ErrInvalidArgument)
	}
	for _, f := range []struct {
		path, loop string
		from, to   uint64
	}{{p.DataFile, p.DataLoop, cur.DataSize, opts.DataSize}, {p.MetadataFile, p.MetadataLoop, cur.MetadataSize, opts.MetadataSize}} {
		if f.to <= f.from {
			continue
		}
		if err := os.Truncate(f.path, int64(f.to)); err != nil {
			return fmt.Errorf("loop pool %s: %w", p.Name, err)
		}
		if err := refreshLoopCapacity(f.loop); err != nil {
			return fmt.Errorf("loop pool %s: %w", p.Name, err)
		}
	}
	return p.reload(func(params *PoolParams, length Sectors) Sectors {
		if opts.LowWaterMark != 0 {
			params.LowWaterMark = opts.LowWaterMark
		}
		block := Sectors(params.BlockSizeSectors)
		return max(BytesToSectors(max(opts.DataSize, cur.DataSize))/block*block, length)
	})
}

// SetErrorIfNoSpace reloads the pool's table with error_if_no_space on
// (writes to a full pool fail at once) or off (they wait, up to the
// kernel's no_space_timeout, for the pool to grow).
func (p *LoopPool) SetErrorIfNoSpace(on bool) error {
	return p.reload(func(params *PoolParams, length Sectors) Sectors {
		params.ErrorIfNoSpace = on
		return length
	})
}

// reload reloads the pool's table with the parameters and data length
// change makes of the current ones (suspend and resume). Writes the pool
// holds back because it is full are requeued, not lost: a pool's suspend
// suspends its thin devices without flushing.
func (p *LoopPool) reload(change func(params *PoolParams, length Sectors) Sectors) error {
	table, err := p.c.Table(p.Name)
	if err != nil {
		return err
	}
	if len(table) != 1 || table[0].Type != "thin-pool" {
		return fmt.Errorf("device %s is not a thin pool (table %v): %w", p.Name, table, errdefs.ErrFailedPrecondition)
	}
	params, err := ParsePoolParams(table[0].Params)
	if err != nil {
		return err
	}
	length := change(&params, table[0].Length)
	t, err := poolTable(length, params)
	if err != nil {
		return err
	}
	if err := p.c.Reload(p.Name, []Target{t}); err != nil {
		return fmt.Errorf("loop pool %s: %w", p.Name, err)
	}
	p.DataSectors = length
	return nil
}
