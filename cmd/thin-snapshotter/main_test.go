package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// runApp runs the command line and returns the configuration the root
// command would serve with (nil if it did not get that far) and its output.
func runApp(t *testing.T, args ...string) (*config.Config, string, error) {
	t.Helper()
	var got *config.Config
	var stdout, stderr bytes.Buffer
	app := newApp(func(_ context.Context, cfg *config.Config) error {
		got = cfg
		return nil
	}, &stdout, &stderr)
	err := app.Run(context.Background(), append([]string{"thin-snapshotter"}, args...))
	return got, stdout.String(), err
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestResolveConfig(t *testing.T) {
	dir := t.TempDir()
	custom := filepath.Join(dir, "custom.toml")
	writeFile(t, custom, `root = "/srv/from-file"
address = "/run/from-file.sock"
log_level = "warn"
[pool]
name = "vg-pool-tpool"
`)
	invalid := filepath.Join(dir, "invalid.toml")
	writeFile(t, invalid, "[snapshot]\nfs_type = \"zfs\"\n")
	unknownKey := filepath.Join(dir, "unknown.toml")
	writeFile(t, unknownKey, "adress = \"/x.sock\"\n")
	presentDefault := filepath.Join(dir, "default-present.toml")
	writeFile(t, presentDefault, "root = \"/srv/default-file\"\n")
	missingDefault := filepath.Join(dir, "default-missing.toml")

	tests := []struct {
		name       string
		defaultCfg string // what defaultConfigPath points at
		args       []string
		want       func(c *config.Config) // applied to config.Default()
		err        []string               // substrings; nil means success
	}{
		{name: "missing default file is fine", defaultCfg: missingDefault, want: func(*config.Config) {}},
		{
			name: "default file is read when present", defaultCfg: presentDefault,
			want: func(c *config.Config) { c.Root = "/srv/default-file" },
		},
		{
			name: "explicit file", defaultCfg: missingDefault, args: []string{"--config", custom},
			want: func(c *config.Config) {
				c.Root, c.Address, c.LogLevel, c.Pool.Name = "/srv/from-file", "/run/from-file.sock", "warn", "vg-pool-tpool"
			},
		},
		{
			name: "flags override the file", defaultCfg: missingDefault,
			args: []string{"-c", custom, "--root", "/srv/flag", "--address", "/run/flag.sock", "--log-level", "debug"},
			want: func(c *config.Config) {
				c.Root, c.Address, c.LogLevel, c.Pool.Name = "/srv/flag", "/run/flag.sock", "debug", "vg-pool-tpool"
			},
		},
		{
			name: "one flag overrides only its key", defaultCfg: missingDefault,
			args: []string{"--config", custom, "-a", "/run/only-address.sock"},
			want: func(c *config.Config) {
				c.Root, c.Address, c.LogLevel, c.Pool.Name = "/srv/from-file", "/run/only-address.sock", "warn", "vg-pool-tpool"
			},
		},
		{
			name: "flags without a file", defaultCfg: missingDefault, args: []string{"--root", "/r", "--address", "/s.sock"},
			want: func(c *config.Config) { c.Root, c.Address = "/r", "/s.sock" },
		},
		{
			name: "explicit missing file is an error", defaultCfg: missingDefault,
			args: []string{"--config", filepath.Join(dir, "nope.toml")},
			err:  []string{"nope.toml", "not found"},
		},
		{
			name: "explicit default path that is missing is an error", defaultCfg: missingDefault,
			args: []string{"--config", missingDefault},
			err:  []string{"default-missing.toml"},
		},
		{name: "invalid file", defaultCfg: missingDefault, args: []string{"-c", invalid}, err: []string{"snapshot.fs_type", "zfs", "invalid.toml"}},
		{name: "unknown key", defaultCfg: missingDefault, args: []string{"-c", unknownKey}, err: []string{`unknown key "adress"`}},
		{name: "invalid flag value", defaultCfg: missingDefault, args: []string{"--log-level", "loud"}, err: []string{"log_level", "loud"}},
		{name: "relative root flag", defaultCfg: missingDefault, args: []string{"--root", "rel"}, err: []string{"root", "absolute"}},
		{name: "unknown flag", defaultCfg: missingDefault, args: []string{"--pool", "x"}, err: []string{"pool"}},
		{name: "stray argument", defaultCfg: missingDefault, args: []string{"serve"}, err: []string{`unexpected argument "serve"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			old := defaultConfigPath
			defaultConfigPath = tt.defaultCfg
			defer func() { defaultConfigPath = old }()

			got, _, err := runApp(t, tt.args...)
			if tt.err != nil {
				if err == nil {
					t.Fatalf("succeeded with %+v", got)
				}
				if got != nil {
					t.Errorf("served despite error %v", err)
				}
				for _, w := range tt.err {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := config.Default()
			tt.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("config = %+v\nwant     %+v", got, want)
			}
		})
	}
}

func TestResolveConfigErrorKinds(t *testing.T) {
	old := defaultConfigPath
	defaultConfigPath = filepath.Join(t.TempDir(), "missing.toml")
	defer func() { defaultConfigPath = old }()

	_, _, err := runApp(t, "--config", filepath.Join(t.TempDir(), "missing.toml"))
	if !errdefs.IsNotFound(err) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing explicit config: %v is not NotFound", err)
	}
	_, _, err = runApp(t, "--log-level", "loud")
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("invalid flag: %v is not InvalidArgument", err)
	}
}

func TestConfigDefaultCommand(t *testing.T) {
	old := defaultConfigPath
	// config default must not read the config file, even a broken one.
	broken := filepath.Join(t.TempDir(), "broken.toml")
	writeFile(t, broken, "this is not toml")
	defaultConfigPath = broken
	defer func() { defaultConfigPath = old }()

	served, out, err := runApp(t, "config", "default")
	if err != nil {
		t.Fatal(err)
	}
	if served != nil {
		t.Fatal("config default started the daemon")
	}
	var want bytes.Buffer
	if err := config.Render(&want, config.Default()); err != nil {
		t.Fatal(err)
	}
	if out != want.String() {
		t.Fatalf("config default printed\n%s\nwant\n%s", out, want.String())
	}
	parsed, err := config.Parse([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(parsed, config.Default()) {
		t.Fatalf("printed default parses to %+v", parsed)
	}
}
