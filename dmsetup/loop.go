//go:build linux

package dmsetup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Names of the backing files inside LoopPoolConfig.Dir.
const (
	LoopDataFile     = "data"
	LoopMetadataFile = "metadata"
)

const (
	loopControl     = "/dev/loop-control"
	loopAttachTries = 16
	metaHeaderSize  = 4096
)

// LoopPoolConfig describes a thin pool backed by two sparse files.
type LoopPoolConfig struct {
	// Dir holds the "data" and "metadata" files.
	Dir string
	// Name is the dm device name of the pool.
	Name string
	// DataSize and MetadataSize (bytes) are used when the files are
	// created, and required then; existing files keep their size. The
	// defaults and limits are the caller's (snapshotter.Config).
	DataSize     uint64
	MetadataSize uint64
	// BlockSizeSectors is the pool block size; 0 means 128 (64KiB).
	BlockSizeSectors uint32
	// LowWaterMark in data blocks, for the kernel's low-space event.
	LowWaterMark uint64
	// ErrorIfNoSpace fails writes at once when the pool is full instead of
	// queueing them.
	ErrorIfNoSpace bool
}

// LoopPool is a thin pool on loop devices.
type LoopPool struct {
	Name             string // dm name of the pool
	DevicePath       string // node of the pool device
	DataFile         string
	MetadataFile     string
	DataLoop         string // e.g. /dev/loop3
	MetadataLoop     string
	BlockSizeSectors uint32
	DataSectors      Sectors // length of the pool table
	// Reused is true when the pool device already existed on our files.
	Reused bool

	c *Client
}

// CreateLoopPool sets up the pool described by cfg, or reuses the pool device
// cfg.Name when it already runs on cfg's files. After a reboot (device gone,
// files present) the existing metadata is kept.
func CreateLoopPool(ctx context.Context, c *Client, cfg LoopPoolConfig) (*LoopPool, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	dir, err := makeLoopPoolDir(cfg.Dir)
	if err != nil {
		return nil, err
	}
	p := &LoopPool{
		Name:             cfg.Name,
		DevicePath:       c.DevicePath(cfg.Name),
		DataFile:         filepath.Join(dir, LoopDataFile),
		MetadataFile:     filepath.Join(dir, LoopMetadataFile),
		BlockSizeSectors: cfg.BlockSizeSectors,
		c:                c,
	}

	if _, err := c.Info(cfg.Name); err == nil {
		if err := p.adopt(); err != nil {
			return nil, err
		}
		return p, nil
	} else if !errors.Is(err, unix.ENXIO) {
		return nil, err
	}

	if err := p.prepareFiles(cfg); err != nil {
		return nil, err
	}
	if err := p.sizeFromDataFile(); err != nil {
		return nil, err
	}
	if err := p.create(cfg); err != nil {
		return nil, err
	}
	return p, nil
}

// check fills in the default block size and refuses a configuration that
// cannot make a pool, before anything is created on disk.
func (cfg *LoopPoolConfig) check() error {
	if err := checkName(cfg.Name); err != nil {
		return err
	}
	if cfg.Dir == "" {
		return fmt.Errorf("loop pool %s: no directory: %w", cfg.Name, errdefs.ErrInvalidArgument)
	}
	if cfg.BlockSizeSectors == 0 {
		cfg.BlockSizeSectors = MinBlockSizeSectors
	}
	if err := ValidateBlockSize(cfg.BlockSizeSectors); err != nil {
		return fmt.Errorf("loop pool %s: %w", cfg.Name, err)
	}
	return nil
}

// makeLoopPoolDir creates the directory of the pool's files when it is
// missing and returns its absolute path with symlinks resolved. The path
// must be resolved because a loop device reports the resolved path of its
// backing file, and adopt compares the two.
func makeLoopPoolDir(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(dir)
}

// sizeFromDataFile sets the pool's length to the size of its data file,
// rounded down to whole blocks, the unit in which the pool hands out space.
func (p *LoopPool) sizeFromDataFile() error {
	dataSize, err := fileSize(p.DataFile)
	if err != nil {
		return err
	}
	block := Sectors(p.BlockSizeSectors)
	p.DataSectors = BytesToSectors(dataSize) / block * block
	if p.DataSectors == 0 {
		return fmt.Errorf("loop pool %s: data file %s smaller than one block: %w", p.Name, p.DataFile, errdefs.ErrInvalidArgument)
	}
	return nil
}

// create attaches the pool's files to loop devices and creates the
// thin-pool device on them.
//
// The loop devices stay open here until the pool device holds them. Once
// these file descriptors close, the pool is the only holder left, so the
// loop devices clear themselves when the pool is removed, or at once when
// creating the pool fails.
func (p *LoopPool) create(cfg LoopPoolConfig) error {
	metaLoop, err := attachLoop(p.MetadataFile)
	if err != nil {
		return fmt.Errorf("loop pool %s: attach %s: %w", p.Name, p.MetadataFile, err)
	}
	defer metaLoop.close()
	dataLoop, err := attachLoop(p.DataFile)
	if err != nil {
		return fmt.Errorf("loop pool %s: attach %s: %w", p.Name, p.DataFile, err)
	}
	defer dataLoop.close()
	p.MetadataLoop, p.DataLoop = metaLoop.path, dataLoop.path

	table, err := poolTable(p.DataSectors, PoolParams{
		MetadataDev:      metaLoop.devArg(),
		DataDev:          dataLoop.devArg(),
		BlockSizeSectors: p.BlockSizeSectors,
		LowWaterMark:     cfg.LowWaterMark,
		SkipBlockZeroing: true,
		ErrorIfNoSpace:   cfg.ErrorIfNoSpace,
	})
	if err != nil {
		return err
	}
	if err := p.c.Create(p.Name, []Target{table}, CreateOptions{}); err != nil {
		return fmt.Errorf("loop pool %s: %w", p.Name, err)
	}
	return nil
}

// adopt fills p from the running pool device if it is backed by p's files.
func (p *LoopPool) adopt() error {
	params, length, err := p.c.PoolTarget(p.Name)
	if errors.Is(err, ErrMalformed) {
		return fmt.Errorf("device %s exists and is not a thin pool: %w: %w", p.Name, err, errdefs.ErrAlreadyExists)
	} else if err != nil {
		return err
	}
	metaDev, metaFile := loopBacking(params.MetadataDev)
	dataDev, dataFile := loopBacking(params.DataDev)
	if metaFile != p.MetadataFile || dataFile != p.DataFile {
		return fmt.Errorf("thin pool %s exists on %s and %s, not on %s and %s: %w",
			p.Name, params.MetadataDev, params.DataDev, p.MetadataFile, p.DataFile, errdefs.ErrAlreadyExists)
	}
	p.MetadataLoop, p.DataLoop = metaDev, dataDev
	p.BlockSizeSectors = params.BlockSizeSectors
	p.DataSectors = length
	p.Reused = true
	return nil
}

// loopBacking maps a table device argument "major:minor" to its loop node
// and backing file; both are empty if it is not a bound loop device.
func loopBacking(devArg string) (string, string) {
	major, minor, err := parseMajorMinor(devArg)
	if err != nil {
		return "", ""
	}
	sys := sysBlockDir(major, minor)
	b, err := os.ReadFile(sys + "/loop/backing_file")
	if err != nil {
		return "", ""
	}
	link, err := os.Readlink(sys)
	if err != nil {
		return "", ""
	}
	return "/dev/" + filepath.Base(link), strings.TrimSpace(string(b))
}

// prepareFiles creates missing backing files. A new metadata file gets a
// zeroed header so the kernel formats it instead of reading garbage.
func (p *LoopPool) prepareFiles(cfg LoopPoolConfig) error {
	_, errMeta := os.Stat(p.MetadataFile)
	_, errData := os.Stat(p.DataFile)
	switch {
	case errMeta == nil && errData == nil:
		return nil
	case errMeta == nil && os.IsNotExist(errData):
		return fmt.Errorf("loop pool %s: metadata file exists but data file %s is missing: %w", p.Name, p.DataFile, errdefs.ErrFailedPrecondition)
	case errMeta != nil && !os.IsNotExist(errMeta):
		return errMeta
	case errData != nil && !os.IsNotExist(errData):
		return errData
	}
	// Data may exist without metadata (e.g. metadata deleted to reset the
	// pool); fresh metadata then means a fresh, empty pool.
	if cfg.MetadataSize == 0 {
		return fmt.Errorf("loop pool %s: metadata file missing and no MetadataSize: %w", p.Name, errdefs.ErrInvalidArgument)
	}
	if os.IsNotExist(errData) {
		if cfg.DataSize == 0 {
			return fmt.Errorf("loop pool %s: data file missing and no DataSize: %w", p.Name, errdefs.ErrInvalidArgument)
		}
		if err := createSparse(p.DataFile, cfg.DataSize, false); err != nil {
			return err
		}
	}
	return createSparse(p.MetadataFile, cfg.MetadataSize, true)
}

// createSparse creates the file path of size bytes without writing its
// blocks, and with zeroHeader zeroes its first 4KiB. A file it fails to
// finish is removed again.
func createSparse(path string, size uint64, zeroHeader bool) (err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	if err := f.Truncate(int64(size)); err != nil {
		return err
	}
	if zeroHeader {
		if _, err := f.WriteAt(make([]byte, metaHeaderSize), 0); err != nil {
			return err
		}
	}
	return f.Sync()
}

func fileSize(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return uint64(fi.Size()), nil
}

// close removes the pool device; its loop devices detach themselves.
// Thin devices still active on the pool make it fail with EBUSY.
func (p *LoopPool) close(ctx context.Context) error {
	err := p.c.Remove(ctx, p.Name, RemoveOptions{})
	if err != nil && !errors.Is(err, unix.ENXIO) {
		return err
	}
	return nil
}

// Destroy closes the pool and deletes its backing files.
func (p *LoopPool) Destroy(ctx context.Context) error {
	if err := p.close(ctx); err != nil {
		return err
	}
	var errs []error
	for _, f := range []string{p.DataFile, p.MetadataFile} {
		if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// loopDev is an attached loop device held open by us.
type loopDev struct {
	f            *os.File
	path         string
	major, minor uint32
}

func (l *loopDev) devArg() string { return MajorMinor(l.major, l.minor) }
func (l *loopDev) close()         { _ = l.f.Close() }

// attachLoop binds file to a free loop device with autoclear set.
func attachLoop(file string) (*loopDev, error) {
	backing, err := os.OpenFile(file, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// Closing our descriptor is safe: the loop device holds its own
	// reference to the file.
	defer backing.Close()
	ctl, err := os.OpenFile(loopControl, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer ctl.Close()

	var info unix.LoopInfo64
	info.Flags = unix.LO_FLAGS_AUTOCLEAR
	copy(info.File_name[:len(info.File_name)-1], file)

	for range loopAttachTries {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		path := "/dev/loop" + strconv.Itoa(n)
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		err = configureLoop(int(f.Fd()), int(backing.Fd()), &info)
		if errors.Is(err, unix.EBUSY) {
			// Another process took this device between GET_FREE and now.
			f.Close()
			continue
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			f.Close()
			return nil, err
		}
		return &loopDev{f: f, path: path, major: unix.Major(st.Rdev), minor: unix.Minor(st.Rdev)}, nil
	}
	return nil, fmt.Errorf("no free loop device after %d attempts: %w", loopAttachTries, unix.EBUSY)
}

// configureLoop uses LOOP_CONFIGURE (5.8+) and falls back to LOOP_SET_FD +
// LOOP_SET_STATUS64 on kernels that do not know it.
func configureLoop(loopFd, fileFd int, info *unix.LoopInfo64) error {
	cfg := unix.LoopConfig{Fd: uint32(fileFd), Info: *info}
	err := unix.IoctlLoopConfigure(loopFd, &cfg)
	if err == nil || !(errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY)) {
		if err != nil {
			return fmt.Errorf("LOOP_CONFIGURE: %w", err)
		}
		return nil
	}
	if err := unix.IoctlSetInt(loopFd, unix.LOOP_SET_FD, fileFd); err != nil {
		return fmt.Errorf("LOOP_SET_FD: %w", err)
	}
	if err := unix.IoctlLoopSetStatus64(loopFd, info); err != nil {
		_ = unix.IoctlSetInt(loopFd, unix.LOOP_CLR_FD, 0)
		return fmt.Errorf("LOOP_SET_STATUS64: %w", err)
	}
	return nil
}
