// Package config is thin-snapshotter's TOML configuration: its defaults,
// parsing (unknown keys are an error), validation, and the commented default
// file printed by `thin-snapshotter config default`.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
)

// Defaults.
const (
	DefaultPath         = "/etc/thin-snapshotter/config.toml"
	DefaultRoot         = "/var/lib/thin-snapshotter"
	DefaultAddress      = "/run/thin-snapshotter/thin-snapshotter.sock"
	DefaultLogLevel     = "info"
	DefaultDataSize     = 100 * GiB
	DefaultMetadataSize = 1 * GiB
	DefaultBlockSize    = 64 * KiB
	DefaultBaseSize     = 10 * GiB
	DefaultFSType       = FSTypeExt4
)

// Filesystems a base device can be formatted with.
const (
	FSTypeExt4 = "ext4"
	FSTypeXFS  = "xfs"
)

// Limits enforced by Validate.
const (
	// dm-thin's data block size: a multiple of 128 sectors, up to 2^21 sectors.
	MinBlockSize      = 64 * KiB
	MaxBlockSize      = 1 * GiB
	MinDataSize       = 64 * MiB
	MinMetadataSize   = 2 * MiB
	MaxMetadataSize   = 16 * GiB // dm-thin uses at most about 15.9GiB of it
	MinBaseSizeExt4   = 16 * MiB
	MinBaseSizeXFS    = 300 * MiB // mkfs.xfs refuses smaller filesystems
	sectorSize        = 512
	maxDMNameLen      = 127 // DM_NAME_LEN minus the NUL
	maxUnixSocketPath = 107 // sun_path minus the NUL
)

// LogLevels are the accepted log_level values.
var LogLevels = []string{"trace", "debug", "info", "warn", "error", "fatal", "panic"}

// Config is the whole configuration file.
type Config struct {
	// Root holds the database and the embedded pool's files.
	Root string `toml:"root"`
	// Address is the unix socket serving containerd's snapshots API.
	Address string `toml:"address"`
	// LogLevel is one of LogLevels.
	LogLevel string `toml:"log_level"`
	// MetricsAddress is host:port for a Prometheus /metrics endpoint; empty disables it.
	MetricsAddress string         `toml:"metrics_address"`
	Pool           PoolConfig     `toml:"pool"`
	Snapshot       SnapshotConfig `toml:"snapshot"`
}

// PoolConfig selects the thin pool.
type PoolConfig struct {
	// Name of an existing thin pool; empty means the embedded loopback pool.
	Name string `toml:"name"`
	// DataSize, MetadataSize and BlockSize shape the embedded pool.
	DataSize     ByteSize `toml:"data_size"`
	MetadataSize ByteSize `toml:"metadata_size"`
	BlockSize    ByteSize `toml:"block_size"`
	// AllowAdopt accepts a pool whose transaction id or devices do not
	// match the database.
	AllowAdopt bool `toml:"allow_adopt"`
	// MinFreeData and MinFreeMetadata are percentages of the pool that
	// must stay free for new snapshots; 0 disables the check.
	MinFreeData     float64 `toml:"min_free_data"`
	MinFreeMetadata float64 `toml:"min_free_metadata"`
}

// SnapshotConfig shapes the snapshots' devices and filesystems.
type SnapshotConfig struct {
	BaseSize     ByteSize `toml:"base_size"`
	FSType       string   `toml:"fs_type"`
	MkfsOptions  []string `toml:"mkfs_options"`
	MountOptions []string `toml:"mount_options"`
	AsyncRemove  bool     `toml:"async_remove"`
	Discard      bool     `toml:"discard"`
}

// Default returns the default configuration.
func Default() *Config {
	return &Config{
		Root:     DefaultRoot,
		Address:  DefaultAddress,
		LogLevel: DefaultLogLevel,
		Pool: PoolConfig{
			DataSize:     DefaultDataSize,
			MetadataSize: DefaultMetadataSize,
			BlockSize:    DefaultBlockSize,
			// Room for running containers to finish their writes, and
			// for an administrator to grow a pool, before it is full.
			MinFreeData:     5,
			MinFreeMetadata: 10,
		},
		Snapshot: SnapshotConfig{
			BaseSize: DefaultBaseSize,
			FSType:   DefaultFSType,
			// Empty rather than nil: a parsed `[]` compares equal.
			MkfsOptions:  []string{},
			MountOptions: []string{},
		},
	}
}

// Parse reads a TOML document over the defaults: keys it leaves out keep
// their default values. It does not validate; call Validate after applying
// command line overrides.
func Parse(data []byte) (*Config, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return nil, describeDecodeError(err)
	}
	return cfg, nil
}

// LoadFile parses the file at path. A missing file is an error matching
// os.ErrNotExist (and errdefs.ErrNotFound).
func LoadFile(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("config file %s: %w: %w", path, errdefs.ErrNotFound, err)
		}
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	return cfg, nil
}

// describeDecodeError turns go-toml's errors into one message that names
// the line and key, wrapped as InvalidArgument.
func describeDecodeError(err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		msgs := make([]string, 0, len(strict.Errors))
		for i := range strict.Errors {
			e := &strict.Errors[i]
			line, _ := e.Position()
			msgs = append(msgs, fmt.Sprintf("unknown key %q (line %d)", strings.Join(e.Key(), "."), line))
		}
		return fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, strings.Join(msgs, "; "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, col := de.Position()
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		if k := de.Key(); len(k) > 0 {
			return fmt.Errorf("%w: line %d, column %d: %s: %s", errdefs.ErrInvalidArgument, line, col, strings.Join(k, "."), msg)
		}
		return fmt.Errorf("%w: line %d, column %d: %s", errdefs.ErrInvalidArgument, line, col, msg)
	}
	return fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, err)
}

// FieldError is one invalid value; it matches errdefs.ErrInvalidArgument.
type FieldError struct {
	Key string // dotted TOML key, e.g. "pool.block_size"
	Msg string
}

func (e *FieldError) Error() string { return e.Key + ": " + e.Msg }

// Unwrap makes errors.Is(err, errdefs.ErrInvalidArgument) hold.
func (e *FieldError) Unwrap() error { return errdefs.ErrInvalidArgument }

// Validate checks every value and reports all invalid ones at once, each as
// a *FieldError naming its key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, &FieldError{Key: key, Msg: fmt.Sprintf(format, args...)})
	}

	switch {
	case c.Root == "":
		bad("root", "must not be empty")
	case !filepath.IsAbs(c.Root):
		bad("root", "%q must be an absolute path", c.Root)
	case filepath.Clean(c.Root) == "/":
		bad("root", "must not be /")
	}

	switch {
	case c.Address == "":
		bad("address", "must not be empty")
	case !filepath.IsAbs(c.Address):
		bad("address", "%q must be an absolute path to a unix socket", c.Address)
	case strings.HasSuffix(c.Address, "/"):
		bad("address", "%q names a directory, not a socket", c.Address)
	case len(c.Address) > maxUnixSocketPath:
		bad("address", "%q is %d bytes long; unix socket paths are limited to %d", c.Address, len(c.Address), maxUnixSocketPath)
	}

	if !isLogLevel(c.LogLevel) {
		bad("log_level", "%q is not one of %s", c.LogLevel, strings.Join(LogLevels, ", "))
	}

	if c.MetricsAddress != "" {
		if err := checkHostPort(c.MetricsAddress); err != nil {
			bad("metrics_address", "%q: %v", c.MetricsAddress, err)
		}
	}

	if c.Pool.Name != "" {
		if msg := checkPoolName(c.Pool.Name); msg != "" {
			bad("pool.name", "%q %s", c.Pool.Name, msg)
		}
	}
	bs := c.Pool.BlockSize
	if bs < MinBlockSize || bs > MaxBlockSize || bs%MinBlockSize != 0 {
		bad("pool.block_size", "%s (%d bytes) must be a multiple of 64KiB between 64KiB and 1GiB", bs, uint64(bs))
	}
	if ds := c.Pool.DataSize; ds < MinDataSize || ds%sectorSize != 0 {
		bad("pool.data_size", "%s (%d bytes) must be at least %s and a multiple of 512 bytes", ds, uint64(ds), MinDataSize)
	}
	if ms := c.Pool.MetadataSize; ms < MinMetadataSize || ms > MaxMetadataSize || ms%sectorSize != 0 {
		bad("pool.metadata_size", "%s (%d bytes) must be between %s and %s and a multiple of 512 bytes", ms, uint64(ms), MinMetadataSize, MaxMetadataSize)
	}

	for key, v := range map[string]float64{"pool.min_free_data": c.Pool.MinFreeData, "pool.min_free_metadata": c.Pool.MinFreeMetadata} {
		if v < 0 || v >= 100 {
			bad(key, "%v must be a percentage from 0 to below 100", v)
		}
	}

	minBase := MinBaseSizeExt4
	switch c.Snapshot.FSType {
	case FSTypeExt4:
	case FSTypeXFS:
		minBase = MinBaseSizeXFS
	default:
		bad("snapshot.fs_type", "%q is not supported; use %q or %q", c.Snapshot.FSType, FSTypeExt4, FSTypeXFS)
	}
	if b := c.Snapshot.BaseSize; b < minBase || b%sectorSize != 0 {
		bad("snapshot.base_size", "%s (%d bytes) must be at least %s for %s and a multiple of 512 bytes", b, uint64(b), minBase, c.Snapshot.FSType)
	}
	for i, o := range c.Snapshot.MkfsOptions {
		if o == "" || strings.ContainsRune(o, 0) {
			bad(fmt.Sprintf("snapshot.mkfs_options[%d]", i), "%q must be a non-empty argument without NUL bytes", o)
		}
	}
	for i, o := range c.Snapshot.MountOptions {
		key := fmt.Sprintf("snapshot.mount_options[%d]", i)
		switch {
		case o == "" || strings.ContainsRune(o, 0):
			bad(key, "%q must be a non-empty option without NUL bytes", o)
		case strings.Contains(o, ","):
			bad(key, "%q: give one option per entry instead of a comma-separated list", o)
		case o == "ro" || o == "rw":
			bad(key, "%q is chosen by the snapshotter (views are read-only, active snapshots writable)", o)
		}
	}
	return errors.Join(errs...)
}

func isLogLevel(s string) bool {
	for _, l := range LogLevels {
		if s == l {
			return true
		}
	}
	return false
}

func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("must be host:port: %w", err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port %q must be a number from 0 to 65535", port)
	}
	return nil
}

// checkPoolName returns why name cannot be a device-mapper device name, or "".
func checkPoolName(name string) string {
	switch {
	case len(name) > maxDMNameLen:
		return fmt.Sprintf("is longer than %d bytes", maxDMNameLen)
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
