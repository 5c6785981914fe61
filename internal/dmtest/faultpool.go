package dmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// Fault is what a FaultDev does to the I/O it passes on.
type Fault string

// Faults a FaultDev can inject, each a dm target swapped in by a table
// reload.
const (
	// FaultNone passes every I/O on (linear).
	FaultNone Fault = "none"
	// FaultWriteErrors fails every write and flush, reads still work
	// (flakey with error_writes, always down).
	FaultWriteErrors Fault = "write errors"
	// FaultDead fails every I/O, as a disk that went away (error).
	FaultDead Fault = "dead"
)

// FaultDev is a dm device over a loop device whose table a test swaps to
// inject a fault under whoever uses it.
type FaultDev struct {
	// Name is the dm name, Path its node.
	Name, Path string
	loop       string
	sectors    dmsetup.Sectors
}

// FaultPool is a thin pool whose metadata and data devices are FaultDevs
// (<name>-meta, <name>-data) over loop devices on sparse files, with a
// spare loop device the size of the metadata for thin_repair.
type FaultPool struct {
	// Name is the thin-pool device's dm name.
	Name       string
	Meta, Data *FaultDev
	// Spare is an unused device as large as Meta.
	Spare string
	c     *dmsetup.Client
	loops []string
}

// RequireTarget fails tb (skips it without RequireEnv) when the kernel
// lacks dm target typ; the VM bench loads the modules THIN_VM_MODULES
// names (the Makefile's kernel targets add dm-flakey).
func RequireTarget(tb testing.TB, typ string) {
	tb.Helper()
	Require(tb)
	c, err := dmsetup.Open()
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	if _, err := c.TargetVersion(typ); err == nil {
		return
	}
	// On a host the module may just not be loaded yet.
	_ = exec.Command("modprobe", "dm-"+typ).Run()
	if _, err := c.TargetVersion(typ); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			tb.Fatalf("dm target %s required (%s=1; in the VM bench, THIN_VM_MODULES=dm-%s): %v", typ, RequireEnv, typ, err)
		}
		tb.Skipf("no dm target %s: %v", typ, err)
	}
}

// NewFaultPool makes a FaultPool named name in dir: metaSize and dataSize
// bytes, blocks of blockSectors sectors, error_if_no_space so that nothing
// queues. tb's cleanup takes down every device of it, the thin devices
// named after it included.
func NewFaultPool(tb testing.TB, dir, name string, metaSize, dataSize uint64, blockSectors uint32) *FaultPool {
	tb.Helper()
	c, err := dmsetup.Open()
	if err != nil {
		tb.Fatal(err)
	}
	p := &FaultPool{Name: name, c: c}
	tb.Cleanup(func() {
		if err := p.destroy(); err != nil {
			tb.Errorf("taking down fault pool %s: %v", name, err)
		}
	})
	loop := func(file string, size uint64) string {
		tb.Helper()
		path := filepath.Join(dir, file)
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			tb.Fatal(err)
		}
		if err := os.Truncate(path, int64(size)); err != nil {
			tb.Fatal(err)
		}
		out, err := exec.Command("losetup", "--find", "--show", path).Output()
		if err != nil {
			tb.Fatalf("losetup %s: %v", path, err)
		}
		dev := strings.TrimSpace(string(out))
		p.loops = append(p.loops, dev)
		return dev
	}
	dev := func(suffix, file string, size uint64) *FaultDev {
		tb.Helper()
		d := &FaultDev{Name: name + "-" + suffix, loop: loop(file, size), sectors: dmsetup.BytesToSectors(size)}
		if err := c.Create(d.Name, []dmsetup.Target{d.table(FaultNone)}, dmsetup.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
		d.Path = c.DevicePath(d.Name)
		return d
	}
	p.Meta = dev("meta", "metadata", metaSize)
	p.Data = dev("data", "data", dataSize)
	p.Spare = loop("spare", metaSize)
	// No low water mark: nothing here watches for it.
	params := fmt.Sprintf("%s %s %d 0 1 error_if_no_space", p.Meta.Path, p.Data.Path, blockSectors)
	pool := dmsetup.Target{Length: p.Data.sectors, Type: "thin-pool", Params: params}
	if err := c.Create(name, []dmsetup.Target{pool}, dmsetup.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	return p
}

// table is d's table with fault f.
func (d *FaultDev) table(f Fault) dmsetup.Target {
	t := dmsetup.Target{Length: d.sectors}
	switch f {
	case FaultWriteErrors:
		// Up for 0 s, down for 1: always down.
		t.Type, t.Params = "flakey", d.loop+" 0 0 1 1 error_writes"
	case FaultDead:
		t.Type = "error"
	default:
		t.Type, t.Params = "linear", d.loop+" 0"
	}
	return t
}

// SetFault makes d inject f from now on (FaultNone: none), by a table
// reload under its user.
func (p *FaultPool) SetFault(d *FaultDev, f Fault) error {
	if err := p.c.Reload(d.Name, []dmsetup.Target{d.table(f)}); err != nil {
		return fmt.Errorf("fault %q on %s: %w", f, d.Name, err)
	}
	return nil
}

// destroy removes the pool's thin devices, the pool, its two devices and
// the loop devices, whichever exist.
func (p *FaultPool) destroy() error {
	ctx := context.Background()
	err := RemoveDevices(ctx, dmsetup.DeviceNamePrefix(p.Name))
	for _, n := range []string{p.Name, p.Name + "-meta", p.Name + "-data"} {
		if rerr := p.c.Remove(ctx, n, dmsetup.RemoveOptions{}); rerr != nil && !dmsetup.IsNotFound(rerr) {
			err = errors.Join(err, rerr)
		}
	}
	for _, l := range p.loops {
		if out, lerr := exec.Command("losetup", "-d", l).CombinedOutput(); lerr != nil {
			err = errors.Join(err, fmt.Errorf("losetup -d %s: %w: %s", l, lerr, out))
		}
	}
	return errors.Join(err, p.c.Close())
}
