package snapshotter

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// Config is what the snapshotter needs to run; the daemon fills it from its
// TOML configuration. A zero size or FSType means its default (no size can
// be zero); a zero MinFree threshold or CheckInterval turns that check off.
type Config struct {
	// Root holds the database and, for the embedded pool, its files; an
	// absolute path.
	Root string
	// PoolName is the dm name of an existing thin pool. Empty (and no
	// PoolLVM) means the embedded loopback pool under Root, named after
	// Root.
	PoolName string
	// PoolLVM is an LVM thin pool as "vg/lv", instead of PoolName:
	// resolved at each start to the dm device that is the thin-pool target,
	// which LVM names differently once the pool has thin volumes
	// (dmsetup.LVMThinPoolNames).
	PoolLVM string
	// Sizes of the embedded loopback pool, used when its files are
	// created; BlockSize is the pool's data block size in bytes.
	DataSize, MetadataSize, BlockSize uint64
	// MaxDataSize lets the embedded pool grow itself up to this many
	// bytes (poolgrow.go): it grows by a step when its free data space
	// falls under its low-water mark, its metadata file doubles when
	// under a quarter of it is free, and writes to it when full wait for
	// the next step while it can grow. The pool never promises more
	// unbacked space than the host file system has free beyond
	// GrowHostReserve. 0 (the default) never grows it.
	MaxDataSize uint64
	// GrowStep is the least the data file grows by at a time, and the
	// least free space under which it grows; a pool filling fast grows
	// earlier and by more.
	GrowStep uint64
	// GrowHostReserve is the host free space growth never hands out.
	GrowHostReserve uint64
	// AllowAdopt lets the database take over a pool whose transaction id
	// does not match its own (a pool used before, or by someone else).
	AllowAdopt bool

	// BaseSize is the virtual size of every thin device, in bytes.
	BaseSize uint64
	// FSType is FSTypeExt4 or FSTypeXFS.
	FSType string
	// MkfsOptions are passed to mkfs before the device argument.
	MkfsOptions []string
	// MountOptions are added to every returned mount.
	MountOptions []string
	// AsyncRemove leaves the deactivation and deletion of removed
	// snapshots to the background worker.
	AsyncRemove bool
	// Discard adds the discard mount option (online discard): when a
	// container deletes files, its filesystem discards their blocks and the
	// thin device gives them back to the pool at once, instead of keeping
	// them mapped until the snapshot is removed. Whether the pool passes
	// them on to its own storage (the embedded pool's sparse file, a thin
	// LV's disk) depends on the pool's discard passdown and that storage.
	Discard bool
	// DiscardOnDelete discards a snapshot's blocks before its thin device
	// is deleted, so the pool passes them on to its storage: on the
	// embedded pool this punches holes in the sparse data file and the
	// host gets the space back. Deleting alone only frees the blocks in
	// the pool's metadata. It costs time on devices with much data. Nil
	// means on for the embedded pool and off for an existing pool.
	DiscardOnDelete *bool

	// MinFreeData and MinFreeMetadata are the percentages of the pool's
	// data and metadata space that must stay free for Prepare and View to
	// make new devices; below them they fail with ResourceExhausted, so
	// running containers keep the room that is left. 0 turns a check off;
	// DefaultMinFreeData and DefaultMinFreeMetadata are the recommended
	// values.
	MinFreeData, MinFreeMetadata float64

	// Classes are the size classes Class serves: key spaces of their own
	// on the same pool, whose active snapshots get the class's size.
	Classes []SizeClass

	// CheckInterval is how often the snapshotter checks itself: the
	// online check, then the repairs that are safe while it serves
	// (selfcheck.go). It also checks once after a startup recovery that
	// did something. 0 turns both off; DefaultCheckInterval is the
	// recommended value.
	CheckInterval time.Duration
	// ImageFSMirror mounts the image filesystem mirror at
	// imagefs.Dir(Root) and keeps its size and free space on the pool's
	// (imagefs.go): what the kubelet sees of the image filesystem. Off,
	// a mirror left there is taken down and the directory stays plain.
	ImageFSMirror bool
}

// SizeClass names a default disk size for the active snapshots of a class.
type SizeClass struct {
	// Name is lower-case letters, digits, '-', '_' and '.', starting with
	// a letter or digit, at most 64 bytes.
	Name string
	// Size in bytes: at least BaseSize, at most 1 PiB, a multiple
	// of BaseSizeAlign.
	Size uint64
}

// discardOnDelete is DiscardOnDelete with its default applied.
func (c *Config) discardOnDelete() bool {
	if c.DiscardOnDelete != nil {
		return *c.DiscardOnDelete
	}
	return c.PoolName == ""
}

// Filesystems a base device can be formatted with.
const (
	FSTypeExt4 = "ext4"
	FSTypeXFS  = "xfs"
)

// Defaults: the sizes and FSType are what a zero field means; the MinFree
// thresholds are only recommended, as zero turns them off.
const (
	DefaultDataSize        = 100 << 30
	DefaultMetadataSize    = 1 << 30
	DefaultBlockSize       = MinBlockSize
	DefaultBaseSize        = 10 << 30
	DefaultFSType          = FSTypeExt4
	DefaultGrowStep        = 10 << 30
	DefaultGrowHostReserve = 1 << 30
	// Room for running containers to finish their writes, and for an
	// administrator to grow the pool, before it is full. Metadata
	// exhaustion corrupts nothing but fails every write: more headroom.
	DefaultMinFreeData     = 5
	DefaultMinFreeMetadata = 10
	// A check reads the pool's whole metadata (thin_ls): hourly finds a
	// problem long before it grows, at a cost no node notices.
	DefaultCheckInterval = time.Hour
)

// Limits checked by Validate, in bytes.
const (
	// dm-thin's data block size (checked by dmsetup.ValidateBlockSize).
	MinBlockSize    = dmsetup.MinBlockSizeSectors * dmsetup.SectorSize
	MaxBlockSize    = dmsetup.MaxBlockSizeSectors * dmsetup.SectorSize
	MinDataSize     = 64 << 20
	MinMetadataSize = 2 << 20
	// dm-thin uses at most about 15.9GiB of its metadata device.
	MaxMetadataSize = 16 << 30
	MinBaseSizeExt4 = 16 << 20
	// mkfs.xfs refuses smaller filesystems.
	MinBaseSizeXFS = 300 << 20
	// BaseSizeAlign keeps the base device a whole number of filesystem
	// blocks.
	BaseSizeAlign = 4096
	// maxPoolNameLen is DM_NAME_LEN without the NUL.
	maxPoolNameLen = 127
	// maxDeviceSize bounds the virtual size of a device (1 PiB): far
	// beyond any pool, small enough that no size arithmetic overflows.
	maxDeviceSize = 1 << 50
	// maxClassNameLen bounds a size class name.
	maxClassNameLen = 64
)

// MinCheckInterval is the shortest CheckInterval but 0: each check reads
// the pool's whole metadata.
const MinCheckInterval = time.Minute

// FieldError is one invalid Config field; it matches
// errdefs.ErrInvalidArgument. The daemon maps Field to its configuration key.
type FieldError struct {
	// Field is the Config field's name, with the entry's index for a list:
	// "BaseSize", "MountOptions[1]".
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// Unwrap makes errors.Is(err, errdefs.ErrInvalidArgument) hold.
func (e *FieldError) Unwrap() error { return errdefs.ErrInvalidArgument }

// Validate reports whether New would accept c: it applies the defaults to a
// copy and returns every invalid field at once, each as a *FieldError,
// joined.
func (c Config) Validate() error {
	c.setDefaults()
	return c.validate()
}

func (c *Config) setDefaults() {
	if c.DataSize == 0 {
		c.DataSize = DefaultDataSize
	}
	if c.MetadataSize == 0 {
		c.MetadataSize = DefaultMetadataSize
	}
	if c.BlockSize == 0 {
		c.BlockSize = DefaultBlockSize
	}
	if c.BaseSize == 0 {
		c.BaseSize = DefaultBaseSize
	}
	if c.FSType == "" {
		c.FSType = DefaultFSType
	}
	if c.GrowStep == 0 {
		c.GrowStep = DefaultGrowStep
	}
	if c.GrowHostReserve == 0 {
		c.GrowHostReserve = DefaultGrowHostReserve
	}
}

// validate checks c after setDefaults.
func (c *Config) validate() error {
	var v fieldErrors
	c.validatePool(&v)
	c.validatePoolSizes(&v)
	c.validateSnapshot(&v)
	c.validateClasses(&v)
	c.validateOptions(&v)
	if ci := c.CheckInterval; ci != 0 && ci < MinCheckInterval {
		v.bad("CheckInterval", "%s: must be 0 (off) or at least %s", ci, MinCheckInterval)
	}
	return errors.Join(v...)
}

// fieldErrors collects the invalid fields of a Config.
type fieldErrors []error

func (v *fieldErrors) bad(field, format string, args ...any) {
	*v = append(*v, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
}

// validatePool checks where the database and the pool are.
func (c *Config) validatePool(v *fieldErrors) {
	switch {
	case c.Root == "":
		v.bad("Root", "must not be empty")
	case !filepath.IsAbs(c.Root):
		v.bad("Root", "%q must be an absolute path", c.Root)
	case filepath.Clean(c.Root) == "/":
		v.bad("Root", "must not be /")
	}
	if c.PoolName != "" {
		if msg := checkPoolName(c.PoolName); msg != "" {
			v.bad("PoolName", "%q %s", c.PoolName, msg)
		}
	}
	if c.PoolLVM != "" {
		if _, _, err := dmsetup.ParseLVMName(c.PoolLVM); err != nil {
			v.bad("PoolLVM", "%v", err)
		}
		if c.PoolName != "" {
			v.bad("PoolLVM", "set either it or PoolName, not both")
		}
	}
}

// validatePoolSizes checks the embedded pool's sizes and growth, and the
// free space kept.
func (c *Config) validatePoolSizes(v *fieldErrors) {
	bs := c.BlockSize
	blockOK := bs%dmsetup.SectorSize == 0 && bs <= MaxBlockSize && dmsetup.ValidateBlockSize(uint32(dmsetup.BytesToSectors(bs))) == nil
	if !blockOK {
		v.bad("BlockSize", "%d bytes: must be a multiple of %s from %s to %s",
			bs, humanSize(dmsetup.BlockSizeMultiple*dmsetup.SectorSize), humanSize(MinBlockSize), humanSize(MaxBlockSize))
	}
	switch ds := c.DataSize; {
	case ds < MinDataSize || ds%dmsetup.SectorSize != 0:
		v.bad("DataSize", "%d bytes: must be at least %s and a multiple of %d bytes", ds, humanSize(MinDataSize), dmsetup.SectorSize)
	case blockOK && ds < bs:
		v.bad("DataSize", "%d bytes: smaller than one %d-byte block of the pool", ds, bs)
	}
	switch md := c.MaxDataSize; {
	case md == 0:
	case c.PoolName != "":
		v.bad("MaxDataSize", "only the embedded pool grows itself; grow pool %s with its own tools (LVM: thin_pool_autoextend_threshold)", c.PoolName)
	case md < c.DataSize || md%dmsetup.SectorSize != 0:
		v.bad("MaxDataSize", "%d bytes: must be 0 (no growth) or at least DataSize (%d) and a multiple of %d bytes", md, c.DataSize, dmsetup.SectorSize)
	}
	if gs := c.GrowStep; (blockOK && gs < bs) || gs%dmsetup.SectorSize != 0 {
		v.bad("GrowStep", "%d bytes: must be at least one %d-byte pool block and a multiple of %d bytes", gs, bs, dmsetup.SectorSize)
	}
	if ms := c.MetadataSize; ms < MinMetadataSize || ms > MaxMetadataSize || ms%dmsetup.SectorSize != 0 {
		v.bad("MetadataSize", "%d bytes: must be from %s to %s and a multiple of %d bytes", ms, humanSize(MinMetadataSize), humanSize(MaxMetadataSize), dmsetup.SectorSize)
	}
	for _, f := range []struct {
		field string
		v     float64
	}{{"MinFreeData", c.MinFreeData}, {"MinFreeMetadata", c.MinFreeMetadata}} {
		// Written so that NaN fails too.
		if !(f.v >= 0 && f.v < 100) {
			v.bad(f.field, "%v must be a percentage from 0 (off) to below 100", f.v)
		}
	}
}

// validateSnapshot checks the snapshots' filesystem and size.
func (c *Config) validateSnapshot(v *fieldErrors) {
	minBase := uint64(MinBaseSizeExt4)
	switch c.FSType {
	case FSTypeExt4:
	case FSTypeXFS:
		minBase = MinBaseSizeXFS
	default:
		v.bad("FSType", "%q is not supported; use %q or %q", c.FSType, FSTypeExt4, FSTypeXFS)
	}
	if b := c.BaseSize; b < minBase || b > maxDeviceSize || b%BaseSizeAlign != 0 {
		v.bad("BaseSize", "%d bytes: must be from %s for %s to %s and a multiple of %d bytes", b, humanSize(minBase), c.FSType, humanSize(maxDeviceSize), BaseSizeAlign)
	}
}

// validateClasses checks the size classes.
func (c *Config) validateClasses(v *fieldErrors) {
	seen := map[string]bool{}
	for i, cl := range c.Classes {
		field := fmt.Sprintf("Classes[%d]", i)
		if msg := checkClassName(cl.Name); msg != "" {
			v.bad(field+".Name", "%q %s", cl.Name, msg)
		} else if seen[cl.Name] {
			v.bad(field+".Name", "%q is used twice", cl.Name)
		}
		seen[cl.Name] = true
		if cl.Size < c.BaseSize || cl.Size > maxDeviceSize || cl.Size%BaseSizeAlign != 0 {
			v.bad(field+".Size", "%d bytes: must be from the base size (%s) to %s and a multiple of %d bytes",
				cl.Size, humanSize(c.BaseSize), humanSize(maxDeviceSize), BaseSizeAlign)
		}
	}
}

// validateOptions checks the mkfs and mount options.
func (c *Config) validateOptions(v *fieldErrors) {
	for i, o := range c.MkfsOptions {
		if o == "" || strings.ContainsRune(o, 0) {
			v.bad(fmt.Sprintf("MkfsOptions[%d]", i), "%q must be a non-empty argument without NUL bytes", o)
		}
	}
	for i, o := range c.MountOptions {
		field := fmt.Sprintf("MountOptions[%d]", i)
		switch {
		case o == "" || strings.ContainsRune(o, 0):
			v.bad(field, "%q must be a non-empty option without NUL bytes", o)
		case strings.Contains(o, ","):
			v.bad(field, "%q: give one option per entry instead of a comma-separated list", o)
		case o == "ro" || o == "rw":
			v.bad(field, "%q is chosen by the snapshotter (views are read-only, active snapshots writable)", o)
		}
	}
}

// humanSize writes a limit for a message.
func humanSize(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// checkPoolName returns why name cannot name an existing pool, or "".
func checkPoolName(name string) string {
	switch {
	case len(name) > maxPoolNameLen:
		return fmt.Sprintf("is longer than %d bytes", maxPoolNameLen)
	case name == "." || name == "..":
		return "is not a device name"
	}
	for _, r := range name {
		if r == '/' || r <= ' ' || r > '~' {
			return "must be printable ASCII without spaces or '/'"
		}
	}
	return ""
}

// checkClassName returns why name cannot name a size class, or "".
func checkClassName(name string) string {
	if name == "" || len(name) > maxClassNameLen {
		return fmt.Sprintf("must be 1 to %d bytes long", maxClassNameLen)
	}
	for i, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case i > 0 && (r == '-' || r == '_' || r == '.'):
		default:
			return "must be lower-case letters, digits, '-', '_' and '.', starting with a letter or digit"
		}
	}
	return ""
}

// LoopPoolName is the dm name of the embedded pool of root: derived from the
// absolute path so daemons with different roots run side by side.
func LoopPoolName(root string) (string, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(abs))
	return "thin-" + hex.EncodeToString(sum[:6]) + "-pool", nil
}
