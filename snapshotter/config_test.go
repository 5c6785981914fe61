package snapshotter

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestConfigDefaults(t *testing.T) {
	c := Config{Root: "/r"}
	c.setDefaults()
	want := Config{
		Root:         "/r",
		DataSize:     DefaultDataSize,
		MetadataSize: DefaultMetadataSize,
		BlockSize:    DefaultBlockSize,
		BaseSize:     DefaultBaseSize,
		FSType:       DefaultFSType,
		// Zero thresholds are off, not defaulted.
	}
	if !equalConfig(c, want) {
		t.Fatalf("setDefaults = %+v, want %+v", c, want)
	}
	// Set values stay.
	set := Config{Root: "/r", DataSize: 1 << 30, MetadataSize: 16 << 20, BlockSize: 128 << 10, BaseSize: 64 << 20, FSType: FSTypeXFS, MinFreeData: 1, MinFreeMetadata: 2}
	got := set
	got.setDefaults()
	if !equalConfig(got, set) {
		t.Fatalf("setDefaults changed a set config: %+v, want %+v", got, set)
	}
	recommended := Config{Root: "/r", MinFreeData: DefaultMinFreeData, MinFreeMetadata: DefaultMinFreeMetadata}
	if err := recommended.Validate(); err != nil {
		t.Fatalf("defaults are invalid: %v", err)
	}
}

func equalConfig(a, b Config) bool {
	return a.Root == b.Root && a.PoolName == b.PoolName && a.PoolLVM == b.PoolLVM && a.DataSize == b.DataSize &&
		a.MetadataSize == b.MetadataSize && a.BlockSize == b.BlockSize && a.BaseSize == b.BaseSize &&
		a.FSType == b.FSType && a.MinFreeData == b.MinFreeData && a.MinFreeMetadata == b.MinFreeMetadata
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name   string
		modify func(c *Config)
		fields []string // fields named by the errors; nil means valid
		msg    string   // substring of the error
	}{
		{name: "zero config but root", modify: func(*Config) {}},
		{name: "empty root", modify: func(c *Config) { c.Root = "" }, fields: []string{"Root"}, msg: "empty"},
		{name: "relative root", modify: func(c *Config) { c.Root = "var/x" }, fields: []string{"Root"}, msg: "absolute"},
		{name: "root /", modify: func(c *Config) { c.Root = "/." }, fields: []string{"Root"}, msg: "must not be /"},
		{name: "pool name", modify: func(c *Config) { c.PoolName = "vg--a-pool_1-tpool" }},
		{name: "max data size", modify: func(c *Config) { c.MaxDataSize = 2 * DefaultDataSize }},
		{name: "max data size below data size", modify: func(c *Config) { c.MaxDataSize = DefaultDataSize / 2 }, fields: []string{"MaxDataSize"}, msg: "at least DataSize"},
		{name: "max data size of an existing pool", modify: func(c *Config) { c.PoolName, c.MaxDataSize = "tp", 2*DefaultDataSize }, fields: []string{"MaxDataSize"}, msg: "thin_pool_autoextend_threshold"},
		{name: "grow step under a block", modify: func(c *Config) { c.GrowStep = 512 }, fields: []string{"GrowStep"}, msg: "one"},
		{name: "pool name slash", modify: func(c *Config) { c.PoolName = "a/b" }, fields: []string{"PoolName"}, msg: "'/'"},
		{name: "pool name space", modify: func(c *Config) { c.PoolName = "a b" }, fields: []string{"PoolName"}},
		{name: "pool name non-ASCII", modify: func(c *Config) { c.PoolName = "pööl" }, fields: []string{"PoolName"}},
		{name: "pool name dotdot", modify: func(c *Config) { c.PoolName = ".." }, fields: []string{"PoolName"}},
		{name: "pool name at limit", modify: func(c *Config) { c.PoolName = strings.Repeat("p", 127) }},
		{name: "pool name too long", modify: func(c *Config) { c.PoolName = strings.Repeat("p", 128) }, fields: []string{"PoolName"}, msg: "127"},
		{name: "lvm pool", modify: func(c *Config) { c.PoolLVM = "vg-0/thin-pool" }},
		{name: "lvm pool no slash", modify: func(c *Config) { c.PoolLVM = "vg0-thinpool-tpool" }, fields: []string{"PoolLVM"}, msg: "not vg/lv"},
		{name: "lvm pool leading dash", modify: func(c *Config) { c.PoolLVM = "vg0/-pool" }, fields: []string{"PoolLVM"}, msg: "starts with '-'"},
		{name: "lvm pool and name", modify: func(c *Config) { c.PoolLVM, c.PoolName = "vg0/thinpool", "vg0-thinpool" }, fields: []string{"PoolLVM"}, msg: "not both"},
		{name: "block size max", modify: func(c *Config) { c.BlockSize = MaxBlockSize }},
		{name: "block size 128KiB", modify: func(c *Config) { c.BlockSize = 128 << 10 }},
		{name: "block size 32KiB", modify: func(c *Config) { c.BlockSize = 32 << 10 }, fields: []string{"BlockSize"}, msg: "multiple of 64KiB from 64KiB to 1GiB"},
		{name: "block size 96KiB", modify: func(c *Config) { c.BlockSize = 96 << 10 }, fields: []string{"BlockSize"}},
		{name: "block size odd", modify: func(c *Config) { c.BlockSize = 64<<10 + 1 }, fields: []string{"BlockSize"}},
		{name: "block size 2GiB", modify: func(c *Config) { c.BlockSize = 2 << 30 }, fields: []string{"BlockSize"}},
		// Would wrap to 64KiB in 32 bits of sectors.
		{name: "block size 2TiB+64KiB", modify: func(c *Config) { c.BlockSize = 2<<40 + 64<<10 }, fields: []string{"BlockSize"}},
		{name: "data size min", modify: func(c *Config) { c.DataSize = MinDataSize }},
		{name: "data size small", modify: func(c *Config) { c.DataSize = MinDataSize - 512 }, fields: []string{"DataSize"}, msg: "at least 64MiB"},
		{name: "data size odd", modify: func(c *Config) { c.DataSize = 1<<30 + 1 }, fields: []string{"DataSize"}, msg: "multiple of 512"},
		{name: "data size below a block", modify: func(c *Config) { c.DataSize, c.BlockSize = 512<<20, 1<<30 }, fields: []string{"DataSize"}, msg: "block"},
		{name: "metadata min", modify: func(c *Config) { c.MetadataSize = MinMetadataSize }},
		{name: "metadata max", modify: func(c *Config) { c.MetadataSize = MaxMetadataSize }},
		{name: "metadata small", modify: func(c *Config) { c.MetadataSize = 1 << 20 }, fields: []string{"MetadataSize"}, msg: "from 2MiB to 16GiB"},
		{name: "metadata big", modify: func(c *Config) { c.MetadataSize = MaxMetadataSize + 512 }, fields: []string{"MetadataSize"}},
		{name: "metadata odd", modify: func(c *Config) { c.MetadataSize = 16<<20 + 1 }, fields: []string{"MetadataSize"}},
		{name: "thresholds", modify: func(c *Config) { c.MinFreeData, c.MinFreeMetadata = 99.5, 0.5 }},
		{name: "threshold negative", modify: func(c *Config) { c.MinFreeData = -1 }, fields: []string{"MinFreeData"}, msg: "0 (off)"},
		{name: "threshold 100", modify: func(c *Config) { c.MinFreeMetadata = 100 }, fields: []string{"MinFreeMetadata"}},
		{name: "threshold NaN", modify: func(c *Config) { c.MinFreeData = math.NaN() }, fields: []string{"MinFreeData"}},
		{name: "threshold +Inf", modify: func(c *Config) { c.MinFreeMetadata = math.Inf(1) }, fields: []string{"MinFreeMetadata"}},
		{name: "xfs", modify: func(c *Config) { c.FSType, c.BaseSize = FSTypeXFS, MinBaseSizeXFS }},
		{name: "xfs small", modify: func(c *Config) { c.FSType, c.BaseSize = FSTypeXFS, MinBaseSizeXFS-4096 }, fields: []string{"BaseSize"}, msg: "300MiB for xfs"},
		{name: "btrfs", modify: func(c *Config) { c.FSType = "btrfs" }, fields: []string{"FSType"}, msg: "not supported"},
		{name: "base min", modify: func(c *Config) { c.BaseSize = MinBaseSizeExt4 }},
		{name: "base small", modify: func(c *Config) { c.BaseSize = MinBaseSizeExt4 - 4096 }, fields: []string{"BaseSize"}, msg: "16MiB for ext4"},
		{name: "base sector multiple only", modify: func(c *Config) { c.BaseSize = 1<<30 + 512 }, fields: []string{"BaseSize"}, msg: "multiple of 4096"},
		{name: "mkfs options", modify: func(c *Config) { c.MkfsOptions = []string{"-m", "crc=1"} }},
		{name: "mkfs option empty", modify: func(c *Config) { c.MkfsOptions = []string{"-m", ""} }, fields: []string{"MkfsOptions[1]"}},
		{name: "mkfs option NUL", modify: func(c *Config) { c.MkfsOptions = []string{"a\x00"} }, fields: []string{"MkfsOptions[0]"}},
		{name: "mount options", modify: func(c *Config) { c.MountOptions = []string{"noatime", "nodev"} }},
		{name: "mount option comma", modify: func(c *Config) { c.MountOptions = []string{"noatime,nodev"} }, fields: []string{"MountOptions[0]"}, msg: "one option per entry"},
		{name: "check interval", modify: func(c *Config) { c.CheckInterval = MinCheckInterval }},
		{name: "check interval short", modify: func(c *Config) { c.CheckInterval = 30 * time.Second }, fields: []string{"CheckInterval"}, msg: "0 (off) or at least 1m0s"},
		{name: "check interval negative", modify: func(c *Config) { c.CheckInterval = -time.Hour }, fields: []string{"CheckInterval"}},
		{name: "mount option rw", modify: func(c *Config) { c.MountOptions = []string{"noatime", "rw"} }, fields: []string{"MountOptions[1]"}, msg: "chosen by the snapshotter"},
		{
			name: "every error at once",
			modify: func(c *Config) {
				c.Root, c.BlockSize, c.FSType, c.MountOptions = "", 1, "zfs", []string{"ro"}
			},
			fields: []string{"Root", "BlockSize", "FSType", "MountOptions[0]"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Config{Root: "/var/lib/thin"}
			tt.modify(&c)
			err := c.Validate()
			if tt.fields == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate succeeded")
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("error is not InvalidArgument: %v", err)
			}
			var got []string
			for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
				var fe *FieldError
				if !errors.As(e, &fe) {
					t.Fatalf("error %v is not a *FieldError", e)
				}
				if !errdefs.IsInvalidArgument(fe) {
					t.Errorf("field error %v is not InvalidArgument", fe)
				}
				got = append(got, fe.Field)
			}
			if !slices.Equal(got, tt.fields) {
				t.Errorf("errors name %q, want %q (%v)", got, tt.fields, err)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not contain %q", err, tt.msg)
			}
		})
	}
}

// New refuses what Validate refuses, before touching anything.
func TestNewValidates(t *testing.T) {
	root := t.TempDir()
	_, err := New(t.Context(), Config{Root: root, BaseSize: 1<<30 + 512})
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "BaseSize" || !errdefs.IsInvalidArgument(err) {
		t.Fatalf("New with a bad base size = %v, want a BaseSize *FieldError", err)
	}
}
