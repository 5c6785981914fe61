package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// thinPool is what the snapshotter needs from the kernel: thin-pool
// messages on one pool and the dm devices of its thin volumes. The real one
// is dmPool; tests use a fake to inject failures and crashes.
type thinPool interface {
	// Name is the dm name of the thin pool.
	Name() string
	// Status is the pool's status as of its last metadata commit: every
	// Prepare and View reads it, and a commit per call would cost as much
	// as a pool message.
	Status() (dmsetup.PoolStatus, error)
	CreateThin(id uint32) error
	CreateSnap(id, origin uint32) error
	DeleteThin(id uint32) error
	SetTransactionID(old, next uint64) error

	// Activate creates dm device name mapping thin id of the pool with the
	// given length; an existing device with the same mapping is kept.
	Activate(name string, id uint32, length dmsetup.Sectors, readOnly bool) error
	// Deactivate removes dm device name; a missing device is not an error.
	Deactivate(ctx context.Context, name string) error
	// Resize gives active device name, mapping thin id, a new length:
	// the table is reloaded and swapped in by a suspend and resume.
	Resize(name string, id uint32, length dmsetup.Sectors) error
	Suspend(name string) error
	Resume(name string) error
	// Discard discards every block of active dm device name (BLKDISCARD),
	// so the pool can hand the space back to its storage.
	Discard(ctx context.Context, name string) error
	Info(name string) (dmsetup.Info, error)
	ThinStatus(name string) (dmsetup.ThinStatus, error)
	List() ([]dmsetup.Device, error)
	DevicePath(name string) string
}

// dmPool implements thinPool with the pure-Go dm client.
type dmPool struct {
	c    *dmsetup.Client
	name string // the dm device with the thin-pool target
	dev  string // major:minor of the pool device, stable without udev
	// id is Name() when it differs from name: an LVM pool is named after
	// its logical volume, whichever dm device carries the target.
	id string
	// aliases are every name the pool may have had when the database
	// recorded it (an LVM pool's dm names); nil means just name.
	aliases []string
}

func newDMPool(c *dmsetup.Client, name string) (*dmPool, error) {
	info, err := c.Info(name)
	if err != nil {
		return nil, fmt.Errorf("thin pool %s: %w", name, err)
	}
	if _, _, err := c.PoolTarget(name); errors.Is(err, dmsetup.ErrMalformed) {
		return nil, fmt.Errorf("device %s is not a thin pool (an LVM thin pool: set [pool] lvm = \"vg/lv\" instead): %w: %w", name, err, errdefs.ErrInvalidArgument)
	} else if err != nil {
		return nil, fmt.Errorf("thin pool %s: %w", name, err)
	}
	return &dmPool{c: c, name: name, dev: dmsetup.MajorMinor(info.Major, info.Minor)}, nil
}

// Name is the pool's stable name: what the database records and its
// devices are named after (poolNames).
func (p *dmPool) Name() string {
	if p.id != "" {
		return p.id
	}
	return p.name
}

// Aliases are the names under which a database may have recorded this pool.
func (p *dmPool) Aliases() []string {
	if p.aliases != nil {
		return p.aliases
	}
	return []string{p.name}
}

func (p *dmPool) Status() (dmsetup.PoolStatus, error) { return p.c.PoolStatusNoCommit(p.name) }
func (p *dmPool) CreateThin(id uint32) error          { return p.c.CreateThin(p.name, id) }
func (p *dmPool) CreateSnap(id, origin uint32) error  { return p.c.CreateSnap(p.name, id, origin) }
func (p *dmPool) DeleteThin(id uint32) error          { return p.c.DeleteThin(p.name, id) }
func (p *dmPool) SetTransactionID(old, next uint64) error {
	return p.c.SetTransactionID(p.name, old, next)
}
func (p *dmPool) Suspend(name string) error {
	return p.c.Suspend(name, dmsetup.SuspendOptions{})
}
func (p *dmPool) Resume(name string) error               { return p.c.Resume(name) }
func (p *dmPool) Info(name string) (dmsetup.Info, error) { return p.c.Info(name) }
func (p *dmPool) List() ([]dmsetup.Device, error)        { return p.c.List() }
func (p *dmPool) DevicePath(name string) string          { return p.c.DevicePath(name) }
func (p *dmPool) ThinStatus(name string) (dmsetup.ThinStatus, error) {
	return p.c.ThinStatus(name)
}

func (p *dmPool) Activate(name string, id uint32, length dmsetup.Sectors, readOnly bool) error {
	t, err := dmsetup.ThinTable(length, p.dev, id, "")
	if err != nil {
		return err
	}
	err = p.c.Create(name, []dmsetup.Target{t}, dmsetup.CreateOptions{ReadOnly: readOnly, UUID: dmsetup.DeviceUUID(p.name, id)})
	if err == nil || !dmsetup.IsExist(err) {
		return err
	}
	// Left from before a crash or restart: keep it if it maps the same
	// thin id, otherwise it is not ours to reuse. One without a table is
	// an activation a crash cut short (names come from thin ids): it
	// gets its table now.
	if info, ierr := p.c.Info(name); ierr == nil && !info.LiveTable {
		if err := p.c.Load(name, []dmsetup.Target{t}, readOnly); err != nil {
			return err
		}
		return p.c.Resume(name)
	}
	tp, _, terr := p.c.ThinTarget(name)
	switch {
	case terr == nil && tp.ID == id:
		return nil
	case terr == nil:
		return fmt.Errorf("device %s exists mapping thin id %d: %w", name, tp.ID, err)
	case errors.Is(terr, dmsetup.ErrMalformed):
		return fmt.Errorf("device %s exists with another table (%w): %w", name, terr, err)
	}
	return fmt.Errorf("%w (and reading its table: %w)", err, terr)
}

func (p *dmPool) Discard(ctx context.Context, name string) error {
	_, err := p.c.Discard(ctx, name)
	return err
}

func (p *dmPool) Resize(name string, id uint32, length dmsetup.Sectors) error {
	t, err := dmsetup.ThinTable(length, p.dev, id, "")
	if err != nil {
		return err
	}
	info, err := p.c.Info(name)
	if err != nil {
		return err
	}
	if err := p.c.Load(name, []dmsetup.Target{t}, info.ReadOnly); err != nil {
		return err
	}
	// Suspending flushes what is in flight; the resume swaps the new
	// table in.
	if err := p.c.Suspend(name, dmsetup.SuspendOptions{}); err != nil {
		return errors.Join(err, p.c.ClearTable(name))
	}
	return p.c.Resume(name)
}

func (p *dmPool) Deactivate(ctx context.Context, name string) error {
	err := p.c.Remove(ctx, name, dmsetup.RemoveOptions{})
	if dmsetup.IsNotFound(err) {
		return nil
	}
	return err
}

// poolGeometry reads the pool's table; dmPool implements it. Without it
// (the unit tests' fake pool) Status reports blocks of Config.BlockSize.
type poolGeometry interface {
	PoolParams() (dmsetup.PoolParams, error)
}

// PoolParams reads the thin-pool table of the pool.
func (p *dmPool) PoolParams() (dmsetup.PoolParams, error) {
	t, err := p.c.Table(p.name)
	if err != nil {
		return dmsetup.PoolParams{}, err
	}
	if len(t) != 1 || t[0].Type != "thin-pool" {
		return dmsetup.PoolParams{}, fmt.Errorf("device %s is not a thin pool (table %v): %w", p.name, t, errdefs.ErrFailedPrecondition)
	}
	return dmsetup.ParsePoolParams(t[0].Params)
}

// ReserveMetadata takes a snapshot of the pool metadata.
func (p *dmPool) ReserveMetadata() (metadataSnapshot, error) {
	return p.c.ReserveMetadataSnapshot(p.name)
}

// ReleaseMetadata drops the pool's metadata snapshot.
func (p *dmPool) ReleaseMetadata() error {
	return p.c.ReleaseMetadataSnap(p.name)
}

// metadataSnapshot is a pool's metadata as it was when reserved
// (dmsetup.MetadataSnapshot).
type metadataSnapshot interface {
	// ThinIDs lists the thin ids in it.
	ThinIDs(ctx context.Context) ([]uint32, error)
	// Release drops it.
	Release() error
}

// ThinTarget reads the table of a thin device.
func (p *dmPool) ThinTarget(name string) (dmsetup.ThinParams, dmsetup.Sectors, error) {
	return p.c.ThinTarget(name)
}

// PoolDevice is the pool's major:minor, as thin tables name it.
func (p *dmPool) PoolDevice() string { return p.dev }

var (
	_ thinPool      = (*dmPool)(nil)
	_ poolInspector = (*dmPool)(nil)
	_ poolGeometry  = (*dmPool)(nil)
)
