package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// fakePool is an in-memory thin pool with the kernel's error numbers, for
// unit tests and fault injection. Errors are *dmsetup.Error like the real
// client's.
type fakePool struct {
	mu      sync.Mutex
	name    string
	txid    uint64
	thins   map[uint32]dmsetup.Sectors // id → mapped sectors
	devices map[string]*fakeDev
	status  dmsetup.PoolStatus

	// hook runs before every operation with its name ("create_snap",
	// "activate", ...); a non-nil error fails the operation. A hook may
	// panic to simulate a crash at that point.
	hook func(op string) error
	ops  []string
	// steps are the operations with their device: "activate tp-snap-3".
	steps []string
	// exists runs when a create finds its id taken, before the EEXIST
	// reaches the caller; it may panic to crash right after the
	// kernel's answer.
	exists func(op string)
	// metaSnap: a metadata snapshot is reserved; onThinIDs runs while
	// one is read (check_test.go).
	metaSnap  bool
	onThinIDs func()
	// noTools: metadata snapshots cannot be read, as without
	// thin-provisioning-tools.
	noTools bool
	// reserved counts the metadata snapshots taken.
	reserved int
}

type fakeDev struct {
	id        uint32
	sectors   dmsetup.Sectors
	readOnly  bool
	suspended bool
	open      int32
}

func newFakePool(name string) *fakePool {
	return &fakePool{name: name, thins: map[uint32]dmsetup.Sectors{}, devices: map[string]*fakeDev{}}
}

func (p *fakePool) step(op, dev string) error {
	p.ops = append(p.ops, op)
	p.steps = append(p.steps, op+" "+dev)
	if p.hook == nil {
		return nil
	}
	var err error
	p.mu.Unlock()
	func() {
		defer p.mu.Lock() // also when the hook panics: callers defer Unlock
		err = p.hook(op)
	}()
	if err != nil {
		return &dmsetup.Error{Op: op, Device: dev, Err: err}
	}
	return nil
}

// exist is the answer to a create whose id is taken; called with mu held.
func (p *fakePool) exist(op string) error {
	if p.exists != nil {
		p.exists(op)
	}
	return errno("message", p.name, unix.EEXIST)
}

func errno(op, dev string, e unix.Errno) error { return &dmsetup.Error{Op: op, Device: dev, Err: e} }

func (p *fakePool) Name() string { return p.name }

func (p *fakePool) Status() (dmsetup.PoolStatus, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("status", p.name); err != nil {
		return dmsetup.PoolStatus{}, err
	}
	st := p.status
	st.TransactionID = p.txid
	return st, nil
}

func (p *fakePool) CreateThin(id uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("create_thin", p.name); err != nil {
		return err
	}
	if _, ok := p.thins[id]; ok {
		return p.exist("create_thin")
	}
	p.thins[id] = 0
	return nil
}

func (p *fakePool) CreateSnap(id, origin uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("create_snap", p.name); err != nil {
		return err
	}
	if _, ok := p.thins[id]; ok {
		return p.exist("create_snap")
	}
	mapped, ok := p.thins[origin]
	if !ok {
		return errno("message", p.name, unix.ENODATA)
	}
	for _, d := range p.devices {
		if d.id == origin && !d.suspended && !d.readOnly && d.open > 0 {
			// The kernel refuses to snapshot an origin with I/O in flight;
			// the fake insists on the suspend the protocol promises. A
			// read-only device, or one nobody holds open, has no writes
			// in flight.
			return fmt.Errorf("create_snap of active, unsuspended origin %d", origin)
		}
	}
	p.thins[id] = mapped
	return nil
}

func (p *fakePool) DeleteThin(id uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("delete", p.name); err != nil {
		return err
	}
	if _, ok := p.thins[id]; !ok {
		return errno("message", p.name, unix.ENODATA)
	}
	for _, d := range p.devices {
		if d.id == id {
			return errno("message", p.name, unix.EBUSY)
		}
	}
	delete(p.thins, id)
	return nil
}

func (p *fakePool) SetTransactionID(old, next uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("set_transaction_id", p.name); err != nil {
		return err
	}
	if old != p.txid {
		return errno("message", p.name, unix.EINVAL)
	}
	p.txid = next
	return nil
}

func (p *fakePool) Activate(name string, id uint32, sectors dmsetup.Sectors, readOnly bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("activate", name); err != nil {
		return err
	}
	if d, ok := p.devices[name]; ok {
		if d.id == id {
			return nil
		}
		return errno("create", name, unix.EEXIST)
	}
	if _, ok := p.thins[id]; !ok {
		return errno("create", name, unix.ENODATA)
	}
	p.devices[name] = &fakeDev{id: id, sectors: sectors, readOnly: readOnly}
	return nil
}

func (p *fakePool) Deactivate(ctx context.Context, name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("deactivate", name); err != nil {
		return err
	}
	d, ok := p.devices[name]
	if !ok {
		return nil
	}
	if d.open > 0 {
		return errno("remove", name, unix.EBUSY)
	}
	delete(p.devices, name)
	return nil
}

func (p *fakePool) Resize(name string, id uint32, sectors dmsetup.Sectors) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("resize", name); err != nil {
		return err
	}
	d, ok := p.devices[name]
	if !ok || d.id != id {
		return errno("table load", name, unix.ENXIO)
	}
	d.sectors = sectors
	return nil
}

func (p *fakePool) Suspend(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("suspend", name); err != nil {
		return err
	}
	d, ok := p.devices[name]
	if !ok {
		return errno("suspend", name, unix.ENXIO)
	}
	d.suspended = true
	return nil
}

func (p *fakePool) Resume(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("resume", name); err != nil {
		return err
	}
	d, ok := p.devices[name]
	if !ok {
		return errno("resume", name, unix.ENXIO)
	}
	d.suspended = false
	return nil
}

// Discard unmaps every block of the device, as the kernel does for a
// thin device; a read-only or open device is refused like the real
// exclusive, writable open.
func (p *fakePool) Discard(_ context.Context, name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.step("discard", name); err != nil {
		return err
	}
	d, ok := p.devices[name]
	switch {
	case !ok:
		return errno("discard open", name, unix.ENXIO)
	case d.readOnly:
		return errno("discard open", name, unix.EROFS)
	case d.open > 0:
		return errno("discard open", name, unix.EBUSY)
	}
	p.thins[d.id] = 0
	return nil
}

func (p *fakePool) Info(name string) (dmsetup.Info, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.devices[name]
	if !ok {
		return dmsetup.Info{}, errno("info", name, unix.ENXIO)
	}
	return dmsetup.Info{Name: name, OpenCount: d.open, Suspended: d.suspended, ReadOnly: d.readOnly, LiveTable: true}, nil
}

func (p *fakePool) ThinStatus(name string) (dmsetup.ThinStatus, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.devices[name]
	if !ok {
		return dmsetup.ThinStatus{}, errno("status", name, unix.ENXIO)
	}
	return dmsetup.ThinStatus{MappedSectors: p.thins[d.id]}, nil
}

func (p *fakePool) List() ([]dmsetup.Device, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []dmsetup.Device
	for n := range p.devices {
		out = append(out, dmsetup.Device{Name: n})
	}
	return out, nil
}

func (p *fakePool) DevicePath(name string) string { return "/dev/mapper/" + name }

// write pretends data was written to an active device.
func (p *fakePool) write(name string, sectors dmsetup.Sectors) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.thins[p.devices[name].id] += sectors
}

func (p *fakePool) setOpen(name string, n int32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.devices[name].open = n
}

// ids lists the thin ids in the pool.
func (p *fakePool) ids() []uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.idsLocked()
}

func (p *fakePool) idsLocked() []uint32 {
	var out []uint32
	for id := range p.thins {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// active maps thin id → read-only flag of every dm device of the pool.
func (p *fakePool) active() map[uint32]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[uint32]bool{}
	for n, d := range p.devices {
		if n == dmsetup.DeviceName(p.name, d.id) {
			out[d.id] = d.readOnly
		}
	}
	return out
}
