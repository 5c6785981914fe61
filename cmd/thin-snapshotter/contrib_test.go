package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

const contribDir = "../../contrib"

// contrib/config.toml is documentation of the defaults: it must be exactly
// what "config default" prints.
func TestContribConfigIsDefault(t *testing.T) {
	got, err := os.ReadFile(filepath.Join(contribDir, "config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	if err := config.Render(&want, config.Default()); err != nil {
		t.Fatal(err)
	}
	if string(got) != want.String() {
		t.Fatal("contrib/config.toml differs from `thin-snapshotter config default`; regenerate it with\n" +
			"  go run ./cmd/thin-snapshotter config default > contrib/config.toml")
	}
}

// containerdConfig mirrors the parts of containerd 2.4's config that the
// snippets set, with containerd's key names; decoding is strict so a
// misspelt key fails here instead of being ignored by containerd.
type containerdConfig struct {
	Version      int `toml:"version"`
	ProxyPlugins map[string]struct {
		Type    string `toml:"type"`
		Address string `toml:"address"`
	} `toml:"proxy_plugins"`
	Plugins struct {
		Transfer struct {
			UnpackConfig []struct {
				Platform    string `toml:"platform"`
				Snapshotter string `toml:"snapshotter"`
				Differ      string `toml:"differ"`
			} `toml:"unpack_config"`
		} `toml:"io.containerd.transfer.v1.local"`
		CRIImages struct {
			Snapshotter string `toml:"snapshotter"`
		} `toml:"io.containerd.cri.v1.images"`
	} `toml:"plugins"`
}

func TestContribContainerdConfigs(t *testing.T) {
	for _, tt := range []struct {
		file    string
		version int
	}{
		{"config-v3.toml", 3},
		{"config-v4.toml", 4},
	} {
		t.Run(tt.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(contribDir, "containerd", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			var c containerdConfig
			if err := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields().Decode(&c); err != nil {
				if strict, ok := errors.AsType[*toml.StrictMissingError](err); ok {
					t.Fatalf("unexpected keys: %s", strict.String())
				}
				t.Fatal(err)
			}
			if c.Version != tt.version {
				t.Errorf("version = %d, want %d", c.Version, tt.version)
			}
			pp, ok := c.ProxyPlugins["thin"]
			if !ok || pp.Type != "snapshot" || pp.Address != config.DefaultAddress {
				t.Errorf("proxy_plugins.thin = %+v (present %v), want type snapshot at %s", pp, ok, config.DefaultAddress)
			}
			var thin, overlay bool
			for _, u := range c.Plugins.Transfer.UnpackConfig {
				if u.Platform != "linux/amd64" || u.Differ != "walking" {
					t.Errorf("unpack_config entry %+v", u)
				}
				thin = thin || u.Snapshotter == "thin"
				overlay = overlay || u.Snapshotter == "overlayfs"
			}
			if !thin || !overlay {
				t.Errorf("unpack_config %+v lacks thin or the default overlayfs", c.Plugins.Transfer.UnpackConfig)
			}
			if c.Plugins.CRIImages.Snapshotter != "thin" {
				t.Errorf("CRI images snapshotter = %q", c.Plugins.CRIImages.Snapshotter)
			}
		})
	}
}

// The unit must match how the daemon behaves: notify type, the binary path
// the docs use, and a stop timeout longer than the daemon's own bound.
func TestContribSystemdUnit(t *testing.T) {
	f, err := os.Open(filepath.Join(contribDir, "systemd", "thin-snapshotter.service"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("malformed line %q", line)
			}
			keys[section+"."+k] = append(keys[section+"."+k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"Service.Type":      "notify",
		"Service.ExecStart": "/usr/local/bin/thin-snapshotter",
		"Service.Restart":   "always",
		"Service.KillMode":  "mixed",
		"Unit.Before":       "containerd.service",
		"Install.WantedBy":  "multi-user.target",
	} {
		if v := keys[k]; len(v) != 1 || v[0] != want {
			t.Errorf("%s = %q, want %q", k, v, want)
		}
	}
	stop := keys["Service.TimeoutStopSec"]
	if len(stop) != 1 {
		t.Fatalf("TimeoutStopSec = %q", stop)
	}
	secs, err := strconv.Atoi(stop[0])
	if err != nil {
		t.Fatal(err)
	}
	// serve waits up to twice shutdownTimeout, then closes the database.
	if least := 2*defaultServeOptions().shutdownTimeout + 10*time.Second; time.Duration(secs)*time.Second < least {
		t.Errorf("TimeoutStopSec=%d is shorter than the daemon's shutdown bound plus margin (%s)", secs, least)
	}
}
