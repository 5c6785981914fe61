package snapshotter

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"

	"github.com/containerd/errdefs"
)

// Config is what the snapshotter needs to run; the daemon fills it from its
// TOML configuration.
type Config struct {
	// Root holds the database and, for the embedded pool, its files.
	Root string
	// PoolName is the dm name of an existing thin pool. Empty means the
	// embedded loopback pool under Root, named after Root.
	PoolName string
	// Sizes of the embedded loopback pool, used when its files are
	// created; BlockSize is the pool's data block size in bytes.
	DataSize, MetadataSize, BlockSize uint64
	// AllowAdopt lets the database take over a pool whose transaction id
	// does not match its own (a pool used before, or by someone else).
	AllowAdopt bool

	// BaseSize is the virtual size of every thin device, in bytes.
	BaseSize uint64
	// FSType is ext4 or xfs.
	FSType string
	// MkfsOptions are passed to mkfs before the device argument.
	MkfsOptions []string
	// MountOptions are added to every returned mount.
	MountOptions []string
	// AsyncRemove leaves the deactivation and deletion of removed
	// snapshots to the background worker and Cleanup.
	AsyncRemove bool
	// Discard adds the discard mount option so freed blocks go back to the
	// pool.
	Discard bool

	// MinFreeData and MinFreeMetadata are the percentages of the pool's
	// data and metadata space that must stay free for Prepare and View to
	// make new devices; below them they fail with ResourceExhausted, so
	// running containers keep the room that is left. Negative disables.
	MinFreeData, MinFreeMetadata float64
}

// Defaults for the fields a zero Config leaves empty.
const (
	DefaultDataSize  = 100 << 30
	DefaultBlockSize = 64 << 10
	DefaultBaseSize  = 10 << 30
	DefaultFSType    = "ext4"
	// Metadata exhaustion corrupts nothing but fails every write: keep
	// more headroom there.
	DefaultMinFreeData     = 5
	DefaultMinFreeMetadata = 10
)

func (c *Config) setDefaults() {
	if c.DataSize == 0 {
		c.DataSize = DefaultDataSize
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
	if c.MinFreeData == 0 {
		c.MinFreeData = DefaultMinFreeData
	}
	if c.MinFreeMetadata == 0 {
		c.MinFreeMetadata = DefaultMinFreeMetadata
	}
}

func (c *Config) validate() error {
	if c.Root == "" {
		return fmt.Errorf("root directory is required: %w", errdefs.ErrInvalidArgument)
	}
	if c.FSType != "ext4" && c.FSType != "xfs" {
		return fmt.Errorf("fs_type %q: want ext4 or xfs: %w", c.FSType, errdefs.ErrInvalidArgument)
	}
	if c.BaseSize%4096 != 0 || c.BaseSize < 16<<20 {
		return fmt.Errorf("base_size %d: want a multiple of 4096 of at least 16MiB: %w", c.BaseSize, errdefs.ErrInvalidArgument)
	}
	if c.BlockSize%(64<<10) != 0 || c.BlockSize > 1<<30 {
		return fmt.Errorf("block_size %d: want a multiple of 64KiB up to 1GiB: %w", c.BlockSize, errdefs.ErrInvalidArgument)
	}
	if c.MinFreeData >= 100 || c.MinFreeMetadata >= 100 {
		return fmt.Errorf("free space thresholds must be below 100%%: %w", errdefs.ErrInvalidArgument)
	}
	return nil
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
