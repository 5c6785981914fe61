package config

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// tomlKeys lists the dotted keys of the file with the Go value behind each.
func tomlKeys(c *Config) map[string]reflect.Value {
	keys := map[string]reflect.Value{}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := 0; i < v.NumField(); i++ {
			key := prefix + v.Type().Field(i).Tag.Get("toml")
			if v.Field(i).Kind() == reflect.Struct {
				walk(key+".", v.Field(i))
				continue
			}
			keys[key] = v.Field(i)
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	return keys
}

// Every field of snapshotter.Config is set from the key snapshotterKeys
// names, and from no other key: changing the key changes that field only.
func TestSnapshotterMapsEveryField(t *testing.T) {
	typ := reflect.TypeFor[snapshotter.Config]()
	if typ.NumField() != len(snapshotterKeys) {
		t.Errorf("snapshotter.Config has %d fields, snapshotterKeys maps %d", typ.NumField(), len(snapshotterKeys))
	}
	base := Default().Snapshotter()
	for i := 0; i < typ.NumField(); i++ {
		field := typ.Field(i).Name
		t.Run(field, func(t *testing.T) {
			key, ok := snapshotterKeys[field]
			if !ok {
				t.Fatalf("no configuration key for snapshotter.Config.%s", field)
			}
			c := Default()
			v, ok := tomlKeys(c)[key]
			if !ok {
				t.Fatalf("snapshotterKeys[%s] = %q, which is not a key of the file", field, key)
			}
			switch v.Kind() {
			case reflect.String:
				v.SetString("/changed")
				if key == "snapshot.discard_on_delete" {
					v.SetString("off") // one of a fixed set
				}
			case reflect.Uint64:
				v.SetUint(v.Uint() + 4096)
			case reflect.Int64:
				v.SetInt(v.Int() + int64(time.Minute))
			case reflect.Float64:
				v.SetFloat(v.Float() + 1)
			case reflect.Bool:
				v.SetBool(!v.Bool())
			case reflect.Slice:
				if v.Type().Elem().Kind() == reflect.Struct {
					v.Set(reflect.ValueOf([]ClassConfig{{Name: "changed", Size: 50 * gib}}))
					break
				}
				v.Set(reflect.ValueOf([]string{"changed"}))
			default:
				t.Fatalf("key %s: unexpected kind %s", key, v.Kind())
			}
			got := c.Snapshotter()
			gv, bv := reflect.ValueOf(got), reflect.ValueOf(base)
			for j := 0; j < typ.NumField(); j++ {
				same := reflect.DeepEqual(gv.Field(j).Interface(), bv.Field(j).Interface())
				if j == i && same {
					t.Errorf("changing %s left %s at %v", key, field, gv.Field(j))
				}
				if j != i && !same {
					t.Errorf("changing %s changed %s too", key, typ.Field(j).Name)
				}
			}
		})
	}
}

// keysOf returns the keys a Validate error names.
func keysOf(t *testing.T, err error) []string {
	t.Helper()
	var keys []string
	for _, e := range unjoin(err) {
		var fe *fieldError
		if !errors.As(e, &fe) {
			t.Fatalf("error %v is not a *fieldError", e)
		}
		keys = append(keys, fe.Key)
	}
	return keys
}

// The daemon accepts exactly the configurations the snapshotter starts
// with, and names the key of every field the snapshotter refuses.
func TestValidateAgreesWithSnapshotter(t *testing.T) {
	tests := []struct {
		name   string
		modify func(c *Config)
	}{
		{"defaults", func(*Config) {}},
		{"zero sizes are defaults", func(c *Config) {
			c.Pool.DataSize, c.Pool.MetadataSize, c.Pool.BlockSize, c.Snapshot.BaseSize = 0, 0, 0, 0
		}},
		{"empty fs type is the default", func(c *Config) { c.Snapshot.FSType = "" }},
		{"thresholds off", func(c *Config) { c.Pool.MinFreeData, c.Pool.MinFreeMetadata = 0, 0 }},
		{"base multiple of 512 only", func(c *Config) { c.Snapshot.BaseSize = 16*mib + 512 }},
		{"base 4KiB multiple", func(c *Config) { c.Snapshot.BaseSize = 16*mib + 4096 }},
		{"xfs small base", func(c *Config) { c.Snapshot.FSType, c.Snapshot.BaseSize = "xfs", 299*mib }},
		{"xfs base", func(c *Config) { c.Snapshot.FSType, c.Snapshot.BaseSize = "xfs", 300*mib }},
		{"block size 96KiB", func(c *Config) { c.Pool.BlockSize = 96 * kib }},
		{"block size 2GiB", func(c *Config) { c.Pool.BlockSize = 2 * gib }},
		{"block size 4GiB+64KiB", func(c *Config) { c.Pool.BlockSize = 4*gib + 64*kib }},
		{"data size odd", func(c *Config) { c.Pool.DataSize = gib + 1 }},
		{"data size tiny", func(c *Config) { c.Pool.DataSize = 512 }},
		{"metadata size max", func(c *Config) { c.Pool.MetadataSize = 16 * gib }},
		{"metadata size over", func(c *Config) { c.Pool.MetadataSize = 16*gib + 512 }},
		{"min free negative", func(c *Config) { c.Pool.MinFreeData = -0.5 }},
		{"min free 99.9", func(c *Config) { c.Pool.MinFreeMetadata = 99.9 }},
		{"relative root", func(c *Config) { c.Root = "x" }},
		{"pool name", func(c *Config) { c.Pool.Name = "vg0-pool-tpool" }},
		{"bad pool name", func(c *Config) { c.Pool.Name = "a/b" }},
		{"lvm pool", func(c *Config) { c.Pool.LVM = "vg-0/thin-pool" }},
		{"bad lvm pool", func(c *Config) { c.Pool.LVM = "vg0-thinpool" }},
		{"lvm and name", func(c *Config) { c.Pool.LVM, c.Pool.Name = "vg0/thinpool", "vg0-thinpool" }},
		{"mount options", func(c *Config) { c.Snapshot.MountOptions = []string{"noatime", "rw", "a,b"} }},
		{"mkfs options", func(c *Config) { c.Snapshot.MkfsOptions = []string{"-m", ""} }},
		{"classes", func(c *Config) {
			c.Classes = []ClassConfig{{Name: "thin-50g", Size: 50 * gib}, {Name: "big.1", Size: tib}}
		}},
		{"bad classes", func(c *Config) {
			c.Classes = []ClassConfig{{Name: "Thin", Size: 50 * gib}, {Name: "small", Size: mib}, {Name: "small", Size: 50*gib + 1}, {Name: "-x", Size: 50 * gib}}
		}},
		{"check off", func(c *Config) { c.CheckInterval = 0 }},
		{"check every minute", func(c *Config) { c.CheckInterval = Duration(time.Minute) }},
		{"check too often", func(c *Config) { c.CheckInterval = Duration(30 * time.Second) }},
		{"check negative", func(c *Config) { c.CheckInterval = Duration(-time.Hour) }},
		{"everything wrong", func(c *Config) {
			c.Root, c.Pool.Name, c.Pool.DataSize, c.Pool.MetadataSize, c.Pool.BlockSize = "", "..", 1, 1, 1
			c.Pool.MinFreeData, c.Pool.MinFreeMetadata = 100, -1
			c.Snapshot.FSType, c.Snapshot.BaseSize = "btrfs", 1
			c.Snapshot.MkfsOptions, c.Snapshot.MountOptions = []string{""}, []string{"ro"}
			c.CheckInterval = 1
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.modify(c)
			cmdErr, libErr := c.Validate(), c.Snapshotter().Validate()
			if (cmdErr == nil) != (libErr == nil) {
				t.Fatalf("config.Validate = %v but snapshotter Validate = %v", cmdErr, libErr)
			}
			if libErr == nil {
				return
			}
			if !errdefs.IsInvalidArgument(cmdErr) || !errdefs.IsInvalidArgument(libErr) {
				t.Errorf("errors are not InvalidArgument: %v; %v", cmdErr, libErr)
			}
			var want []string
			for _, e := range unjoin(libErr) {
				var fe *snapshotter.FieldError
				if !errors.As(e, &fe) {
					t.Fatalf("snapshotter error %v is not a *snapshotter.FieldError", e)
				}
				field, index, isList := strings.Cut(fe.Field, "[")
				key := snapshotterKeys[field]
				if isList {
					index, sub, isField := strings.Cut(index, "].")
					key += "[" + index
					if isField {
						key += "]." + classKeys[sub]
					}
				}
				want = append(want, key)
				if !strings.Contains(cmdErr.Error(), key+": "+fe.Msg) {
					t.Errorf("config error %q lacks %q", cmdErr, key+": "+fe.Msg)
				}
			}
			if got := keysOf(t, cmdErr); !slices.Equal(got, want) {
				t.Errorf("config error names %q, want %q", got, want)
			}
			for f := range snapshotterKeys {
				if strings.Contains(cmdErr.Error(), f+":") || strings.Contains(cmdErr.Error(), f+"[") {
					t.Errorf("config error names the Go field %s: %v", f, cmdErr)
				}
			}
		})
	}
}
