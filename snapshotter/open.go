package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// New opens (or creates) the snapshotter state under cfg.Root, sets up or
// checks the pool, recovers from an earlier crash, makes sure the base
// device exists and starts the background work.
func New(ctx context.Context, cfg Config) (*Snapshotter, error) {
	k, err := openKernel(ctx, &cfg, false)
	if err != nil {
		return nil, err
	}
	s := newSnapshotter(cfg, k.db, k.pool, nil)
	s.closers = k.closers
	if k.loop != nil && cfg.MaxDataSize != 0 {
		s.autogrow = &grower{lp: k.loop, c: k.pool.c}
	}
	if err := s.setUp(ctx); err != nil {
		return nil, k.close(err)
	}
	s.startBackground(ctx)
	return s, nil
}

// OpenForCheck opens the snapshotter state under cfg.Root for Check without
// changing anything: no recovery, no base device, no background work.
// The embedded pool is set up when missing (after a reboot), from its
// existing files only. Fails with a clear error while the daemon runs.
func OpenForCheck(ctx context.Context, cfg Config) (*Snapshotter, error) {
	k, err := openKernel(ctx, &cfg, true)
	if err != nil {
		return nil, err
	}
	s, err := openCheck(ctx, cfg, k.db, k.pool, nil)
	if err != nil {
		return nil, k.close(err)
	}
	s.closers = k.closers
	return s, nil
}

// newSnapshotter is the snapshotter on an open database and pool, before
// any of the work New or OpenForCheck do; format nil is mkfs.
func newSnapshotter(cfg Config, db *storage.DB, pool thinPool, format func(context.Context, string) error) *Snapshotter {
	cfg.setDefaults()
	s := &Snapshotter{cfg: cfg, db: db, pool: pool, format: format}
	s.bg.wake = make(chan struct{}, 1)
	if format == nil {
		s.format = s.mkfs
	}
	s.growFS = s.fillDevice
	s.imagefs.open, s.imagefs.poll = openMirror, imageFSPoll
	return s
}

// setUp checks the pool is the database's, recovers from an earlier crash,
// makes sure the base device exists and sets up the image filesystem
// mirror.
func (s *Snapshotter) setUp(ctx context.Context) (err error) {
	// On a pool that takes no changes, recovery and the base device fail
	// in the kernel.
	defer func() { err = s.blameFault(err) }()
	if err := s.checkOwnership(ctx); err != nil {
		return err
	}
	if err := s.recover(ctx); err != nil {
		return fmt.Errorf("recovery: %w", err)
	}
	if err := s.ensureBase(ctx); err != nil {
		return fmt.Errorf("base device: %w", err)
	}
	s.setUpImageFS(ctx)
	return nil
}

// newWithPool is New after the kernel side is open; unit tests call it with
// a fake pool and a format function that needs no kernel (nil is mkfs).
func newWithPool(ctx context.Context, cfg Config, db *storage.DB, pool thinPool, format func(context.Context, string) error) (*Snapshotter, error) {
	s := newSnapshotter(cfg, db, pool, format)
	if err := s.setUp(ctx); err != nil {
		return nil, err
	}
	s.startBackground(ctx)
	return s, nil
}

// openCheck is OpenForCheck after the kernel side is open (unit tests pass
// a fake pool).
func openCheck(ctx context.Context, cfg Config, db *storage.DB, pool thinPool, format func(context.Context, string) error) (*Snapshotter, error) {
	s := newSnapshotter(cfg, db, pool, format)
	s.forCheck = true
	st, err := pool.Status()
	if err != nil {
		return nil, fmt.Errorf("status of pool %s: %w", pool.Name(), err)
	}
	s.txid = st.TransactionID
	if err := db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		if err == nil && slices.Contains(poolNames(pool), pi.Name) {
			s.recordedPool = pi.Name
		}
		if errdefs.IsNotFound(err) {
			return nil
		}
		return err
	}); err != nil {
		return nil, err
	}
	return s, nil
}

// kernel is what New and OpenForCheck open before the snapshotter: the
// database, the pool, and what closes them (the dm client last).
type kernel struct {
	db      *storage.DB
	pool    *dmPool
	loop    *dmsetup.LoopPool // the embedded pool; nil for an existing one
	closers []func() error
}

// close closes what was opened, newest first, and returns err.
func (k *kernel) close(err error) error {
	for _, v := range slices.Backward(k.closers) {
		_ = v()
	}
	return err
}

// openKernel applies cfg's defaults and rules, then opens the dm client, the
// database under cfg.Root and the pool: cfg.PoolLVM, cfg.PoolName, or the
// embedded loopback pool, set up again from its files when a reboot took it
// down. With existing (a check), nothing new is made: the database and the
// embedded pool's files must be there already.
func openKernel(ctx context.Context, cfg *Config, existing bool) (*kernel, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	dbPath := filepath.Join(cfg.Root, dbFile)
	if err := prepareRoot(cfg.Root, dbPath, existing); err != nil {
		return nil, err
	}
	// With udev running, our devices get /dev/mapper links but no probe:
	// every snapshot carries the base's filesystem UUID.
	client, err := dmsetup.Open(dmsetup.WithUdevFlags(dmsetup.UdevPrivate))
	if err != nil {
		return nil, fmt.Errorf("device-mapper: %w", err)
	}
	k := &kernel{closers: []func() error{client.Close}}

	// The database first: it refuses a second daemon on the same root
	// before that daemon touches the pool.
	if k.db, err = storage.Open(ctx, dbPath); err != nil {
		if existing && errors.Is(err, storage.ErrInUse) {
			err = fmt.Errorf("the daemon is running (database in use): stop it first: %w", err)
		}
		return nil, k.close(err)
	}
	k.closers = append(k.closers, k.db.Close)

	name, lvmID, lvmNames := cfg.PoolName, "", []string(nil)
	switch {
	case cfg.PoolLVM != "":
		if name, lvmID, lvmNames, err = findLVMPool(ctx, client, k.db, cfg.PoolLVM, existing); err != nil {
			return nil, k.close(err)
		}
	case name == "":
		if k.loop, err = embeddedPool(ctx, client, cfg, existing); err != nil {
			return nil, k.close(err)
		}
		name = k.loop.Name
	}
	if k.pool, err = newDMPool(client, name); err != nil {
		return nil, k.close(err)
	}
	if lvmNames != nil {
		// Named after the logical volume, whichever of its dm names
		// carries the pool today.
		k.pool.id = lvmID
		k.pool.aliases = lvmNames
	}
	return k, nil
}

// prepareRoot makes root for a new database at dbPath; for a check
// (existing), the database must be there already.
func prepareRoot(root, dbPath string, existing bool) error {
	if !existing {
		return os.MkdirAll(root, 0o700)
	}
	if _, err := os.Stat(dbPath); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("no database at %s (has the daemon ever run with this root?): %w", dbPath, errdefs.ErrNotFound)
		}
		return err
	}
	return nil
}

// findLVMPool finds the dm device carrying LVM thin pool vg/lv and returns
// its name, the pool's stable name and every dm name LVM may give it. A
// pool that has LVM thin volumes is refused unless the database already
// manages it.
func findLVMPool(ctx context.Context, client *dmsetup.Client, db *storage.DB, vgLV string, existing bool) (name, id string, names []string, err error) {
	vg, lv, _ := dmsetup.ParseLVMName(vgLV) // validated
	id, names = dmsetup.LVMDeviceName(vg, lv), dmsetup.LVMThinPoolNames(vg, lv)
	if name, err = client.FindThinPool(names...); err != nil {
		return "", "", nil, fmt.Errorf("LVM thin pool %s (is it active? lvchange -ay %s): %w", vgLV, vgLV, err)
	}
	if name != names[0] || existing {
		return name, id, names, nil
	}
	var pi storage.PoolInfo
	if err := db.View(ctx, func(tx *storage.Tx) (err error) {
		pi, err = tx.PoolInfo()
		return err
	}); err != nil && !errdefs.IsNotFound(err) {
		return "", "", nil, err
	}
	if pi.Name == "" {
		// Taking it over would advance the transaction id LVM keeps
		// for its own volumes: LVM would never activate the pool again.
		return "", "", nil, fmt.Errorf("LVM thin pool %s is not dedicated: it has LVM thin volumes (its target is %s); "+
			"the daemon needs a thin pool of its own (contrib/pool/make-lvm-pool makes one): %w", vgLV, name, errdefs.ErrFailedPrecondition)
	}
	log.G(ctx).WithField("pool", vgLV).Warnf("LVM thin pool is not dedicated: it has LVM thin volumes (its target is %s); "+
		"their thin ids are recorded as foreign and never used", name)
	return name, id, names, nil
}

// embeddedPool sets up the embedded loopback pool under cfg.Root: made on
// the first start, set up again from its files after a reboot. For a check
// (existing) its files must be there already.
func embeddedPool(ctx context.Context, client *dmsetup.Client, cfg *Config, existing bool) (*dmsetup.LoopPool, error) {
	name, err := LoopPoolName(cfg.Root)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cfg.Root, poolDir)
	if existing {
		for _, f := range []string{dmsetup.LoopDataFile, dmsetup.LoopMetadataFile} {
			// A missing file would be created empty: a new pool,
			// and every record a ghost.
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				return nil, fmt.Errorf("embedded pool file: %w", err)
			}
		}
	}
	var lowWater uint64
	if cfg.MaxDataSize != 0 {
		lowWater = cfg.lowWaterBlocks(cfg.DataSize, growLead{})
	}
	lp, err := dmsetup.CreateLoopPool(ctx, client, dmsetup.LoopPoolConfig{
		Dir:              dir,
		Name:             name,
		DataSize:         cfg.DataSize,
		MetadataSize:     cfg.MetadataSize,
		BlockSizeSectors: uint32(dmsetup.BytesToSectors(cfg.BlockSize)),
		// A full pool that cannot grow fails writes at once instead of
		// holding them for a minute: containers see ENOSPC/EIO, not a
		// hang. One that grows holds them while it grows (poolgrow.go).
		ErrorIfNoSpace: cfg.MaxDataSize == 0,
		LowWaterMark:   lowWater,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded pool: %w", err)
	}
	if existing {
		return lp, nil
	}
	if lp.Reused && cfg.MaxDataSize == 0 {
		// Set up by a daemon that let it grow: it holds writes back
		// when full, but nothing grows it now.
		if st, err := client.PoolStatusNoCommit(name); err == nil && st.NoSpacePolicy != dmsetup.ErrorIfNoSpace {
			if err := lp.SetErrorIfNoSpace(true); err != nil {
				return nil, fmt.Errorf("embedded pool: %w", err)
			}
		}
	}
	log.G(ctx).WithField("pool", name).WithField("reused", lp.Reused).Info("embedded pool ready")
	return lp, nil
}
