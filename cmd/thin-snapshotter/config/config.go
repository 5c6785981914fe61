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
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// Defaults of the daemon's own keys; the snapshotter's are
// snapshotter.Default*.
const (
	DefaultPath     = "/etc/thin-snapshotter/config.toml"
	DefaultRoot     = "/var/lib/thin-snapshotter"
	DefaultAddress  = "/run/thin-snapshotter/thin-snapshotter.sock"
	defaultLogLevel = "info"
)

// maxUnixSocketPath is the longest path a unix socket can have: the 108
// bytes of sun_path less the terminating NUL.
const maxUnixSocketPath = 107

// logLevels are the accepted log_level values.
var logLevels = []string{"trace", "debug", "info", "warn", "error", "fatal", "panic"}

// Config is the whole configuration file.
type Config struct {
	// Root holds the database and the embedded pool's files.
	Root string `toml:"root"`
	// Address is the unix socket serving containerd's snapshots API.
	Address string `toml:"address"`
	// LogLevel is one of trace, debug, info, warn, error, fatal, panic.
	LogLevel string `toml:"log_level"`
	// MetricsAddress is host:port for a Prometheus /metrics endpoint; empty disables it.
	MetricsAddress string `toml:"metrics_address"`
	// CheckInterval is how often the daemon checks itself; 0 never.
	CheckInterval Duration       `toml:"check_interval"`
	Pool          PoolConfig     `toml:"pool"`
	Snapshot      SnapshotConfig `toml:"snapshot"`
	NRI           NRIConfig      `toml:"nri"`
	ImageFS       ImageFSConfig  `toml:"imagefs"`
	// Classes are extra sockets, one per size class ([[class]] tables).
	Classes []ClassConfig `toml:"class"`
}

// ImageFSConfig is what the kubelet sees of the image filesystem.
type ImageFSConfig struct {
	// Mirror mounts a filesystem at <root>/imagefs whose size and free
	// space follow the pool's (snapshotter.Config.ImageFSMirror).
	Mirror bool `toml:"mirror"`
}

// ClassConfig is a size class: a socket of its own on the same pool and
// database, whose containers get Size by default.
type ClassConfig struct {
	Name string   `toml:"name"`
	Size ByteSize `toml:"size"`
	// Address of the class's socket; empty is ClassAddress's default.
	Address string `toml:"address,omitempty"`
}

// ClassAddress is the socket of class i: its address, or <name>.sock next
// to the main socket.
func (c *Config) ClassAddress(i int) string {
	if a := c.Classes[i].Address; a != "" {
		return a
	}
	return filepath.Join(filepath.Dir(c.Address), c.Classes[i].Name+".sock")
}

// PoolConfig selects the thin pool.
type PoolConfig struct {
	// Name of an existing thin pool; empty (and no LVM) means the embedded
	// loopback pool.
	Name string `toml:"name"`
	// LVM is an LVM thin pool as "vg/lv", instead of Name.
	LVM string `toml:"lvm"`
	// DataSize, MetadataSize and BlockSize shape the embedded pool.
	DataSize     ByteSize `toml:"data_size"`
	MetadataSize ByteSize `toml:"metadata_size"`
	BlockSize    ByteSize `toml:"block_size"`
	// MaxDataSize lets the embedded pool grow itself up to it, by
	// GrowStep at a time, keeping GrowHostReserve of the host free; 0 never
	// grows it.
	MaxDataSize     ByteSize `toml:"max_data_size"`
	GrowStep        ByteSize `toml:"grow_step"`
	GrowHostReserve ByteSize `toml:"grow_host_reserve"`
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
	// DiscardOnDelete is "auto", "on" or "off": "auto" leaves the
	// choice to the snapshotter (on for the embedded pool only).
	DiscardOnDelete string `toml:"discard_on_delete"`
}

// discardOnDeleteValues are the accepted snapshot.discard_on_delete values.
var discardOnDeleteValues = []string{"auto", "on", "off"}

// discardOnDelete maps snapshot.discard_on_delete; anything but on and off
// is auto (Validate refuses other values).
func (c *SnapshotConfig) discardOnDelete() *bool {
	switch c.DiscardOnDelete {
	case "on":
		return new(true)
	case "off":
		return new(false)
	}
	return nil
}

// Default returns the default configuration.
func Default() *Config {
	return &Config{
		Root:          DefaultRoot,
		Address:       DefaultAddress,
		LogLevel:      defaultLogLevel,
		CheckInterval: Duration(snapshotter.DefaultCheckInterval),
		Pool: PoolConfig{
			DataSize:        snapshotter.DefaultDataSize,
			MetadataSize:    snapshotter.DefaultMetadataSize,
			BlockSize:       snapshotter.DefaultBlockSize,
			GrowStep:        snapshotter.DefaultGrowStep,
			GrowHostReserve: snapshotter.DefaultGrowHostReserve,
			MinFreeData:     snapshotter.DefaultMinFreeData,
			MinFreeMetadata: snapshotter.DefaultMinFreeMetadata,
		},
		Snapshot: SnapshotConfig{
			BaseSize: snapshotter.DefaultBaseSize,
			FSType:   snapshotter.DefaultFSType,
			// Empty rather than nil, so that a file that says `[]`
			// parses to an equal Config.
			MkfsOptions:     []string{},
			MountOptions:    []string{},
			DiscardOnDelete: "auto",
			// Remove journals the removal before it returns, and
			// the background worker, Cleanup, Close or the next
			// start's recovery finishes it: as safe as deleting
			// inline, and about 50 ms faster per Remove.
			AsyncRemove: true,
		},
		NRI: defaultNRI(),
		// The kubelet's image garbage collection and eviction then act
		// on the pool; a node without a kubelet pays a loop device and a
		// few MiB under root.
		ImageFS: ImageFSConfig{Mirror: true},
	}
}

// Snapshotter returns the snapshotter's part of the configuration. It maps
// each value across as it is: it neither fills in defaults nor checks them.
func (c *Config) Snapshotter() snapshotter.Config {
	var classes []snapshotter.SizeClass
	for _, cl := range c.Classes {
		classes = append(classes, snapshotter.SizeClass{Name: cl.Name, Size: uint64(cl.Size)})
	}
	return snapshotter.Config{
		Root:            c.Root,
		PoolName:        c.Pool.Name,
		PoolLVM:         c.Pool.LVM,
		DataSize:        uint64(c.Pool.DataSize),
		MetadataSize:    uint64(c.Pool.MetadataSize),
		BlockSize:       uint64(c.Pool.BlockSize),
		MaxDataSize:     uint64(c.Pool.MaxDataSize),
		GrowStep:        uint64(c.Pool.GrowStep),
		GrowHostReserve: uint64(c.Pool.GrowHostReserve),
		AllowAdopt:      c.Pool.AllowAdopt,
		MinFreeData:     c.Pool.MinFreeData,
		MinFreeMetadata: c.Pool.MinFreeMetadata,
		BaseSize:        uint64(c.Snapshot.BaseSize),
		FSType:          c.Snapshot.FSType,
		MkfsOptions:     c.Snapshot.MkfsOptions,
		MountOptions:    c.Snapshot.MountOptions,
		AsyncRemove:     c.Snapshot.AsyncRemove,
		Discard:         c.Snapshot.Discard,
		DiscardOnDelete: c.Snapshot.discardOnDelete(),
		Classes:         classes,
		CheckInterval:   time.Duration(c.CheckInterval),
		ImageFSMirror:   c.ImageFS.Mirror,
	}
}

// snapshotterKeys maps each field of snapshotter.Config to the key that
// Snapshotter copies it from, so that validation errors name the key.
var snapshotterKeys = map[string]string{
	"Root":            "root",
	"PoolName":        "pool.name",
	"PoolLVM":         "pool.lvm",
	"DataSize":        "pool.data_size",
	"MetadataSize":    "pool.metadata_size",
	"BlockSize":       "pool.block_size",
	"MaxDataSize":     "pool.max_data_size",
	"GrowStep":        "pool.grow_step",
	"GrowHostReserve": "pool.grow_host_reserve",
	"AllowAdopt":      "pool.allow_adopt",
	"MinFreeData":     "pool.min_free_data",
	"MinFreeMetadata": "pool.min_free_metadata",
	"BaseSize":        "snapshot.base_size",
	"FSType":          "snapshot.fs_type",
	"MkfsOptions":     "snapshot.mkfs_options",
	"MountOptions":    "snapshot.mount_options",
	"AsyncRemove":     "snapshot.async_remove",
	"Discard":         "snapshot.discard",
	"DiscardOnDelete": "snapshot.discard_on_delete",
	"Classes":         "class",
	"CheckInterval":   "check_interval",
	"ImageFSMirror":   "imagefs.mirror",
}

// classKeys maps the fields of snapshotter.SizeClass to the keys of a
// [[class]] table.
var classKeys = map[string]string{"Name": "name", "Size": "size"}

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
	if strict, ok := errors.AsType[*toml.StrictMissingError](err); ok {
		msgs := make([]string, 0, len(strict.Errors))
		for i := range strict.Errors {
			e := &strict.Errors[i]
			line, _ := e.Position()
			msgs = append(msgs, fmt.Sprintf("unknown key %q (line %d)", strings.Join(e.Key(), "."), line))
		}
		return fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, strings.Join(msgs, "; "))
	}
	if de, ok := errors.AsType[*toml.DecodeError](err); ok {
		line, col := de.Position()
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		if k := de.Key(); len(k) > 0 {
			return fmt.Errorf("%w: line %d, column %d: %s: %s", errdefs.ErrInvalidArgument, line, col, strings.Join(k, "."), msg)
		}
		return fmt.Errorf("%w: line %d, column %d: %s", errdefs.ErrInvalidArgument, line, col, msg)
	}
	return fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, err)
}

// fieldError is one invalid value, named by its TOML key; it matches
// errdefs.ErrInvalidArgument.
type fieldError struct {
	Key string // dotted TOML key, e.g. "pool.block_size"
	Msg string
}

func (e *fieldError) Error() string { return e.Key + ": " + e.Msg }

// Unwrap makes errors.Is(err, errdefs.ErrInvalidArgument) hold.
func (e *fieldError) Unwrap() error { return errdefs.ErrInvalidArgument }

// Validate checks every value and reports all invalid ones at once, each
// named by its TOML key (e.g. "pool.block_size: ..."). The snapshotter's
// values are checked by the snapshotter's own Validate, so the daemon
// accepts exactly what it can start with.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, &fieldError{Key: key, Msg: fmt.Sprintf(format, args...)})
	}

	if err := c.Snapshotter().Validate(); err != nil {
		errs = append(errs, renameFieldErrors(err)...)
	}

	if msg := checkSocketPath(c.Address); msg != "" {
		bad("address", "%s", msg)
	}
	sockets := map[string]string{c.Address: "address"}
	names := map[string]bool{}
	for i, cl := range c.Classes {
		if cl.Address == "" && names[cl.Name] {
			// The snapshotter reports a name used twice; the default
			// socket of the second would only repeat that.
			continue
		}
		names[cl.Name] = true
		key := fmt.Sprintf("class[%d].address", i)
		a := c.ClassAddress(i)
		if msg := checkSocketPath(a); msg != "" {
			bad(key, "%s", msg)
		} else if other, ok := sockets[a]; ok {
			bad(key, "%q is also the socket of %s", a, other)
		}
		sockets[a] = key
	}

	if !slices.Contains(discardOnDeleteValues, c.Snapshot.DiscardOnDelete) {
		bad("snapshot.discard_on_delete", "%q is not one of %s", c.Snapshot.DiscardOnDelete, strings.Join(discardOnDeleteValues, ", "))
	}

	c.NRI.validate(bad)

	if !isLogLevel(c.LogLevel) {
		bad("log_level", "%q is not one of %s", c.LogLevel, strings.Join(logLevels, ", "))
	}

	if c.MetricsAddress != "" {
		if err := checkHostPort(c.MetricsAddress); err != nil {
			bad("metrics_address", "%q: %v", c.MetricsAddress, err)
		}
	}
	return errors.Join(errs...)
}

// renameFieldErrors renames the snapshotter's field errors after the TOML
// keys they come from, so that an error names what the user wrote.
func renameFieldErrors(err error) []error {
	var errs []error
	for _, e := range unjoin(err) {
		var fe *snapshotter.FieldError
		if !errors.As(e, &fe) {
			errs = append(errs, e)
			continue
		}
		field, index, isList := strings.Cut(fe.Field, "[")
		key, ok := snapshotterKeys[field]
		if !ok {
			// A field missing from snapshotterKeys keeps its Go name.
			key = fe.Field
		} else if isList {
			// "Classes[1].Size" is "class[1].size".
			index, sub, isField := strings.Cut(index, "].")
			key += "[" + index
			if isField {
				key += "]." + classKeys[sub]
			}
		}
		errs = append(errs, &fieldError{Key: key, Msg: fe.Msg})
	}
	return errs
}

// unjoin returns the errors that errors.Join put together in err, or err
// alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// checkSocketPath returns why path cannot be a socket address, or "".
func checkSocketPath(path string) string {
	switch {
	case path == "":
		return "must not be empty"
	case !filepath.IsAbs(path):
		return fmt.Sprintf("%q must be an absolute path to a unix socket", path)
	case strings.HasSuffix(path, "/"):
		return fmt.Sprintf("%q names a directory, not a socket", path)
	case len(path) > maxUnixSocketPath:
		return fmt.Sprintf("%q is %d bytes long; unix socket paths are limited to %d", path, len(path), maxUnixSocketPath)
	}
	return ""
}

func isLogLevel(s string) bool {
	return slices.Contains(logLevels, s)
}

// checkHostPort checks that addr is host:port with a numeric port.
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
