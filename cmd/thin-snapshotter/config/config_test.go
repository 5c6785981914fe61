package config

import (
	"bytes"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// The kubelet sees the pool unless one turns the mirror off.
func TestDefaultMirrorsTheImageFS(t *testing.T) {
	if c := Default(); !c.ImageFS.Mirror || !c.Snapshotter().ImageFSMirror {
		t.Errorf("default [imagefs] mirror = %v, snapshotter's %v; want on", c.ImageFS.Mirror, c.Snapshotter().ImageFSMirror)
	}
}

func TestDefaultIsValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatalf("default config is invalid: %v", err)
	}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want func(c *Config) // applied to Default() to get the expected config
	}{
		{name: "empty document keeps defaults", doc: "", want: func(*Config) {}},
		{
			name: "top-level keys",
			doc: `root = "/srv/thin"
address = "/run/x/thin.sock"
log_level = "debug"
metrics_address = "127.0.0.1:9101"`,
			want: func(c *Config) {
				c.Root, c.Address, c.LogLevel, c.MetricsAddress = "/srv/thin", "/run/x/thin.sock", "debug", "127.0.0.1:9101"
			},
		},
		{
			name: "check interval",
			doc:  `check_interval = "30m"`,
			want: func(c *Config) { c.CheckInterval = Duration(30 * time.Minute) },
		},
		{
			name: "check off",
			doc:  `check_interval = "0"`,
			want: func(c *Config) { c.CheckInterval = 0 },
		},
		{
			name: "existing pool",
			doc: `[pool]
name = "vg0-thinpool-tpool"
allow_adopt = true`,
			want: func(c *Config) { c.Pool.Name, c.Pool.AllowAdopt = "vg0-thinpool-tpool", true },
		},
		{
			name: "sizes in every form",
			doc: `[pool]
data_size = 1099511627776
metadata_size = "256M"
block_size = "512KiB"
[snapshot]
base_size = "20GB"`,
			want: func(c *Config) {
				c.Pool.DataSize, c.Pool.MetadataSize, c.Pool.BlockSize = tib, 256*mib, 512*kib
				c.Snapshot.BaseSize = 20_000_000_000
			},
		},
		{
			name: "snapshot section",
			doc: `[snapshot]
fs_type = "xfs"
mkfs_options = ["-m", "reflink=0"]
mount_options = ["noatime", "nodiscard"]
async_remove = true
discard = true`,
			want: func(c *Config) {
				c.Snapshot.FSType = "xfs"
				c.Snapshot.MkfsOptions = []string{"-m", "reflink=0"}
				c.Snapshot.MountOptions = []string{"noatime", "nodiscard"}
				c.Snapshot.AsyncRemove, c.Snapshot.Discard = true, true
			},
		},
		{
			name: "nri section",
			doc: `[nri]
enable = false
socket_path = "/run/containerd/nri.sock"`,
			want: func(c *Config) { c.NRI = NRIConfig{Enable: false, SocketPath: "/run/containerd/nri.sock"} },
		},
		{
			name: "image filesystem mirror off",
			doc:  "[imagefs]\nmirror = false",
			want: func(c *Config) { c.ImageFS.Mirror = false },
		},
		{
			name: "dotted keys",
			doc:  `pool.name = "p"` + "\n" + `snapshot.discard = true`,
			want: func(c *Config) { c.Pool.Name, c.Snapshot.Discard = "p", true },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.doc))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			want := Default()
			tt.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("Parse = %+v\nwant    %+v", got, want)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []string // substrings of the error
	}{
		{name: "unknown top-level key", doc: `roots = "/x"`, want: []string{`unknown key "roots"`, "line 1"}},
		{name: "unknown key in section", doc: "[pool]\n\nnmae = \"x\"", want: []string{`unknown key "pool.nmae"`, "line 3"}},
		{name: "unknown section", doc: "[snapshots]\nbase_size = 1", want: []string{`unknown key "snapshots`}},
		{name: "two unknown keys", doc: "a = 1\nb = 2", want: []string{`"a" (line 1)`, `"b" (line 2)`}},
		{name: "bad size unit", doc: "[pool]\ndata_size = \"10 gigs\"", want: []string{"line 2", "data_size", `unknown unit "gigs"`}},
		{name: "fractional size", doc: "[snapshot]\nbase_size = \"1.5GiB\"", want: []string{"base_size", "fractions"}},
		// go-toml reports no position for a float handed to UnmarshalText.
		{name: "float size", doc: "[snapshot]\nbase_size = 1.5", want: []string{`"1.5"`, "fractions"}},
		{name: "negative size", doc: "[pool]\nblock_size = -65536", want: []string{"negative"}},
		{name: "string for bool", doc: "[snapshot]\ndiscard = \"yes\"", want: []string{"line 2", "discard"}},
		{name: "string for list", doc: "[snapshot]\nmount_options = \"noatime\"", want: []string{"line 2", "mount_options"}},
		{name: "syntax error", doc: "root = ", want: []string{"line 1"}},
		{name: "bad duration", doc: `check_interval = "1 hour"`, want: []string{"line 1", "check_interval", `"1h"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			if err == nil {
				t.Fatal("Parse succeeded")
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("error is not InvalidArgument: %v", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// go-toml stores a TOML integer in a Duration as nanoseconds, without
// UnmarshalText: an interval without unit is refused by Validate, naming
// the key.
func TestCheckIntervalWithoutUnit(t *testing.T) {
	c, err := Parse([]byte("check_interval = 3600"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "check_interval: 3.6µs: must be 0 (off) or at least 1m0s") {
		t.Fatalf("Validate = %v", err)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		modify func(c *Config)
		keys   []string // keys named by the errors; nil means valid
		msg    string   // substring of the error
	}{
		{name: "defaults", modify: func(*Config) {}},
		{name: "relative root", modify: func(c *Config) { c.Root = "var/lib/x" }, keys: []string{"root"}, msg: "absolute"},
		{name: "empty root", modify: func(c *Config) { c.Root = "" }, keys: []string{"root"}, msg: "empty"},
		{name: "root is /", modify: func(c *Config) { c.Root = "//" }, keys: []string{"root"}, msg: "must not be /"},
		{name: "empty address", modify: func(c *Config) { c.Address = "" }, keys: []string{"address"}, msg: "empty"},
		{name: "relative address", modify: func(c *Config) { c.Address = "thin.sock" }, keys: []string{"address"}, msg: "absolute"},
		{name: "address is a directory", modify: func(c *Config) { c.Address = "/run/thin/" }, keys: []string{"address"}, msg: "directory"},
		{name: "address too long", modify: func(c *Config) { c.Address = "/" + strings.Repeat("a", 107) }, keys: []string{"address"}, msg: "limited to 107"},
		{name: "address at limit", modify: func(c *Config) { c.Address = "/" + strings.Repeat("a", 106) }},
		{name: "log level", modify: func(c *Config) { c.LogLevel = "verbose" }, keys: []string{"log_level"}, msg: "not one of"},
		{name: "discard on delete", modify: func(c *Config) { c.Snapshot.DiscardOnDelete = "yes" }, keys: []string{"snapshot.discard_on_delete"}, msg: "not one of auto, on, off"},
		{name: "log level empty", modify: func(c *Config) { c.LogLevel = "" }, keys: []string{"log_level"}},
		{name: "metrics address ok", modify: func(c *Config) { c.MetricsAddress = ":9101" }},
		{name: "metrics address ipv6", modify: func(c *Config) { c.MetricsAddress = "[::1]:9101" }},
		{name: "metrics address without port", modify: func(c *Config) { c.MetricsAddress = "localhost" }, keys: []string{"metrics_address"}, msg: "host:port"},
		{name: "metrics port not a number", modify: func(c *Config) { c.MetricsAddress = "localhost:http" }, keys: []string{"metrics_address"}, msg: "port"},
		{name: "metrics port too big", modify: func(c *Config) { c.MetricsAddress = ":70000" }, keys: []string{"metrics_address"}, msg: "port"},
		{name: "pool name lvm style", modify: func(c *Config) { c.Pool.Name = "vg--data-pool_1-tpool" }},
		{name: "pool name with slash", modify: func(c *Config) { c.Pool.Name = "../x" }, keys: []string{"pool.name"}, msg: "'/'"},
		{name: "pool name with space", modify: func(c *Config) { c.Pool.Name = "my pool" }, keys: []string{"pool.name"}},
		{name: "pool name dot", modify: func(c *Config) { c.Pool.Name = ".." }, keys: []string{"pool.name"}},
		{name: "pool name too long", modify: func(c *Config) { c.Pool.Name = strings.Repeat("p", 128) }, keys: []string{"pool.name"}, msg: "longer than 127"},
		{name: "lvm pool", modify: func(c *Config) { c.Pool.LVM = "vg0/thinpool" }},
		{name: "lvm pool without lv", modify: func(c *Config) { c.Pool.LVM = "vg0-thinpool" }, keys: []string{"pool.lvm"}, msg: "not vg/lv"},
		{name: "lvm pool bad char", modify: func(c *Config) { c.Pool.LVM = "vg0/thin pool" }, keys: []string{"pool.lvm"}, msg: "letters, digits"},
		{name: "lvm pool and name", modify: func(c *Config) { c.Pool.LVM, c.Pool.Name = "vg0/thinpool", "vg0-thinpool" }, keys: []string{"pool.lvm"}, msg: "not both"},
		{name: "block size min", modify: func(c *Config) { c.Pool.BlockSize = 64 * kib }},
		{name: "block size max", modify: func(c *Config) { c.Pool.BlockSize = gib }},
		{name: "block size 128KiB", modify: func(c *Config) { c.Pool.BlockSize = 128 * kib }},
		{name: "block size zero is the default", modify: func(c *Config) { c.Pool.BlockSize = 0 }},
		{name: "block size 1", modify: func(c *Config) { c.Pool.BlockSize = 1 }, keys: []string{"pool.block_size"}, msg: "multiple of 64KiB"},
		{name: "block size 32KiB", modify: func(c *Config) { c.Pool.BlockSize = 32 * kib }, keys: []string{"pool.block_size"}},
		{name: "block size not multiple", modify: func(c *Config) { c.Pool.BlockSize = 96 * kib }, keys: []string{"pool.block_size"}},
		{name: "block size too big", modify: func(c *Config) { c.Pool.BlockSize = 2 * gib }, keys: []string{"pool.block_size"}},
		{name: "data size small", modify: func(c *Config) { c.Pool.DataSize = 63 * mib }, keys: []string{"pool.data_size"}, msg: "at least 64MiB"},
		{name: "data size not sector multiple", modify: func(c *Config) { c.Pool.DataSize = gib + 1 }, keys: []string{"pool.data_size"}, msg: "512"},
		{name: "data size decimal", modify: func(c *Config) { c.Pool.DataSize = 1_000_000_000 }},
		{name: "data size below a block", modify: func(c *Config) { c.Pool.DataSize, c.Pool.BlockSize = 512*mib, gib }, keys: []string{"pool.data_size"}, msg: "block"},
		{name: "metadata size small", modify: func(c *Config) { c.Pool.MetadataSize = mib }, keys: []string{"pool.metadata_size"}},
		{name: "metadata size big", modify: func(c *Config) { c.Pool.MetadataSize = 17 * gib }, keys: []string{"pool.metadata_size"}},
		{name: "metadata size max", modify: func(c *Config) { c.Pool.MetadataSize = 16 * gib }},
		{name: "fs type", modify: func(c *Config) { c.Snapshot.FSType = "btrfs" }, keys: []string{"snapshot.fs_type"}, msg: "not supported"},
		{name: "xfs", modify: func(c *Config) { c.Snapshot.FSType = "xfs" }},
		{name: "xfs base too small", modify: func(c *Config) { c.Snapshot.FSType, c.Snapshot.BaseSize = "xfs", 256*mib }, keys: []string{"snapshot.base_size"}, msg: "300MiB for xfs"},
		{name: "ext4 small base", modify: func(c *Config) { c.Snapshot.BaseSize = 16 * mib }},
		{name: "ext4 base too small", modify: func(c *Config) { c.Snapshot.BaseSize = 8 * mib }, keys: []string{"snapshot.base_size"}},
		{name: "base not sector multiple", modify: func(c *Config) { c.Snapshot.BaseSize = gib + 100 }, keys: []string{"snapshot.base_size"}},
		// Validate once accepted this, and the snapshotter then refused it
		// at start.
		{name: "base sector but not 4KiB multiple", modify: func(c *Config) { c.Snapshot.BaseSize = gib + 512 }, keys: []string{"snapshot.base_size"}, msg: "4096"},
		{name: "min free 0 disables", modify: func(c *Config) { c.Pool.MinFreeData, c.Pool.MinFreeMetadata = 0, 0 }},
		{name: "min free negative", modify: func(c *Config) { c.Pool.MinFreeData = -1 }, keys: []string{"pool.min_free_data"}, msg: "percentage"},
		{name: "min free 100", modify: func(c *Config) { c.Pool.MinFreeMetadata = 100 }, keys: []string{"pool.min_free_metadata"}},
		{name: "min free NaN", modify: func(c *Config) { c.Pool.MinFreeData = math.NaN() }, keys: []string{"pool.min_free_data"}},
		{name: "empty mkfs option", modify: func(c *Config) { c.Snapshot.MkfsOptions = []string{"-b", ""} }, keys: []string{"snapshot.mkfs_options[1]"}},
		{name: "mount option with comma", modify: func(c *Config) { c.Snapshot.MountOptions = []string{"noatime,nodev"} }, keys: []string{"snapshot.mount_options[0]"}, msg: "one option per entry"},
		{name: "mount option ro", modify: func(c *Config) { c.Snapshot.MountOptions = []string{"noatime", "ro"} }, keys: []string{"snapshot.mount_options[1]"}, msg: "chosen by the snapshotter"},
		{name: "nri socket relative", modify: func(c *Config) { c.NRI.SocketPath = "nri.sock" }, keys: []string{"nri.socket_path"}, msg: "absolute"},
		{name: "nri socket empty", modify: func(c *Config) { c.NRI.SocketPath = "" }, keys: []string{"nri.socket_path"}, msg: "empty"},
		{name: "nri off needs no socket", modify: func(c *Config) { c.NRI = NRIConfig{} }},
		{name: "mount option empty", modify: func(c *Config) { c.Snapshot.MountOptions = []string{""} }, keys: []string{"snapshot.mount_options[0]"}},
		{
			name: "all errors reported together",
			modify: func(c *Config) {
				c.Root, c.LogLevel, c.Pool.BlockSize, c.Snapshot.FSType = "rel", "loud", 1, "zfs"
			},
			// The snapshotter's keys first, in its order.
			keys: []string{"root", "pool.block_size", "snapshot.fs_type", "log_level"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.modify(c)
			err := c.Validate()
			if tt.keys == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate succeeded")
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error is not InvalidArgument: %v", err)
			}
			var got []string
			for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
				var fe *fieldError
				if !errors.As(e, &fe) {
					t.Fatalf("error %v is not a *fieldError", e)
				}
				got = append(got, fe.Key)
			}
			if !reflect.DeepEqual(got, tt.keys) {
				t.Errorf("errors name keys %q, want %q (%v)", got, tt.keys, err)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not contain %q", err, tt.msg)
			}
		})
	}
}

func TestLoadFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	if err := os.WriteFile(good, []byte("root = \"/srv/x\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("[pool]\nsize = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg, err := LoadFile(good)
	if err != nil || cfg.Root != "/srv/x" || cfg.Address != DefaultAddress {
		t.Fatalf("LoadFile(good) = %+v, %v", cfg, err)
	}
	_, err = LoadFile(filepath.Join(dir, "missing.toml"))
	if !errors.Is(err, os.ErrNotExist) || !errdefs.IsNotFound(err) {
		t.Fatalf("LoadFile(missing) = %v; want ErrNotExist and NotFound", err)
	}
	_, err = LoadFile(bad)
	if err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), `"pool.size"`) {
		t.Fatalf("LoadFile(bad) = %v; want an error naming the file and the key", err)
	}
}

func TestRenderDefaultRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := Render(&buf, Default()); err != nil {
		t.Fatal(err)
	}
	got, err := Parse(buf.Bytes())
	if err != nil {
		t.Fatalf("parsing the rendered default: %v\n%s", err, buf.String())
	}
	if !reflect.DeepEqual(got, Default()) {
		t.Fatalf("rendered default parses to %+v, want %+v", got, Default())
	}
}

// Every value must come from the Config, not from the template text.
func TestRenderRoundTripNonDefault(t *testing.T) {
	c := &Config{
		Root:           `/srv/thin "quoted" \ dir`,
		Address:        "/run/t/t.sock",
		LogLevel:       "trace",
		MetricsAddress: "127.0.0.1:9999",
		CheckInterval:  Duration(90 * time.Minute),
		Pool: PoolConfig{
			Name:         "vg-pool-tpool",
			DataSize:     3*tib + 512,
			MetadataSize: 15 * gib,
			BlockSize:    1 * gib,
			AllowAdopt:   true,
		},
		Snapshot: SnapshotConfig{
			BaseSize:        1_000_000_000,
			FSType:          "xfs",
			MkfsOptions:     []string{"-m", "crc=1", `we"ird`},
			MountOptions:    []string{"noatime"},
			AsyncRemove:     true,
			Discard:         true,
			DiscardOnDelete: "on",
		},
		NRI: NRIConfig{SocketPath: "/run/k3s/nri.sock"},
		Classes: []ClassConfig{
			{Name: "thin-50g", Size: 50 * gib},
			{Name: "big", Size: 2 * tib, Address: "/run/other/big.sock"},
		},
	}
	var buf bytes.Buffer
	if err := Render(&buf, c); err != nil {
		t.Fatal(err)
	}
	got, err := Parse(buf.Bytes())
	if err != nil {
		t.Fatalf("parsing rendered config: %v\n%s", err, buf.String())
	}
	if !reflect.DeepEqual(got, c) {
		t.Fatalf("rendered config parses to %+v, want %+v", got, c)
	}
}

// The template must set every key of Config, each in its section.
func TestRenderHasEveryKey(t *testing.T) {
	var buf bytes.Buffer
	if err := Render(&buf, Default()); err != nil {
		t.Fatal(err)
	}
	section := ""
	seen := map[string]bool{}
	keyRe := regexp.MustCompile(`^([a-z_]+) = `)
	for line := range strings.SplitSeq(buf.String(), "\n") {
		if m := regexp.MustCompile(`^\[([a-z_]+)\]$`).FindStringSubmatch(line); m != nil {
			section = m[1] + "."
			continue
		}
		if m := keyRe.FindStringSubmatch(line); m != nil {
			seen[section+m[1]] = true
		}
	}
	var want []string
	var walk func(prefix string, t reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for f := range typ.Fields() {
			key := prefix + f.Tag.Get("toml")
			if f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct {
				// Arrays of tables ([[class]]): none by default;
				// TestRenderRoundTripNonDefault covers them.
				continue
			}
			if f.Type.Kind() == reflect.Struct {
				walk(key+".", f.Type)
				continue
			}
			want = append(want, key)
		}
	}
	walk("", reflect.TypeFor[Config]())
	for _, k := range want {
		if !seen[k] {
			t.Errorf("rendered config does not set %s", k)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("rendered config sets %d keys, Config has %d", len(seen), len(want))
	}
}

func TestClasses(t *testing.T) {
	c, err := Parse([]byte(`
address = "/run/ts/main.sock"
[snapshot]
base_size = "1GiB"
[[class]]
name = "thin-50g"
size = "50GiB"
[[class]]
name = "big"
size = "1TiB"
address = "/run/other/big.sock"
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.ClassAddress(0); got != "/run/ts/thin-50g.sock" {
		t.Errorf("default class address %q", got)
	}
	if got := c.ClassAddress(1); got != "/run/other/big.sock" {
		t.Errorf("class address %q", got)
	}
	sc := c.Snapshotter().Classes
	if len(sc) != 2 || sc[0].Name != "thin-50g" || sc[0].Size != uint64(50*gib) || sc[1].Size != uint64(tib) {
		t.Errorf("snapshotter classes %+v", sc)
	}

	for _, tc := range []struct {
		name    string
		classes []ClassConfig
		want    []string
	}{
		{"address is the main socket", []ClassConfig{{Name: "a", Size: 50 * gib, Address: "/run/ts/main.sock"}}, []string{"class[0].address"}},
		{"two classes on one socket", []ClassConfig{{Name: "a", Size: 50 * gib}, {Name: "b", Size: 50 * gib, Address: "/run/ts/a.sock"}}, []string{"class[1].address"}},
		{"relative address", []ClassConfig{{Name: "a", Size: 50 * gib, Address: "a.sock"}}, []string{"class[0].address"}},
		{"smaller than the base", []ClassConfig{{Name: "a", Size: 512 * mib}}, []string{"class[0].size"}},
		{"bad name", []ClassConfig{{Name: "A/b", Size: 50 * gib}}, []string{"class[0].name"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c2 := *c
			c2.Classes = tc.classes
			err := c2.Validate()
			if got := keysOf(t, err); !slices.Equal(got, tc.want) {
				t.Errorf("error names %q, want %q (%v)", got, tc.want, err)
			}
		})
	}
}
