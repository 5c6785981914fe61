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
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
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
		Type    string            `toml:"type"`
		Address string            `toml:"address"`
		Exports map[string]string `toml:"exports"`
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
			Snapshotter      string `toml:"snapshotter"`
			RuntimePlatforms map[string]struct {
				Platform    string `toml:"platform"`
				Snapshotter string `toml:"snapshotter"`
			} `toml:"runtime_platforms"`
		} `toml:"io.containerd.cri.v1.images"`
		CRIRuntime struct {
			Containerd struct {
				Runtimes map[string]struct {
					Type                         string `toml:"runtime_type"`
					Snapshotter                  string `toml:"snapshotter"`
					PrivilegedWithoutHostDevices bool   `toml:"privileged_without_host_devices"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"io.containerd.cri.v1.runtime"`
		NRI containerdNRI `toml:"io.containerd.nri.v1.nri"`
	} `toml:"plugins"`
}

// loadContainerdConfig decodes contrib/containerd/<file> strictly.
func loadContainerdConfig(t *testing.T, file string) containerdConfig {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(contribDir, "containerd", file))
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
	return c
}

// contribClass is the size class that contrib/config.toml shows commented
// out, parsed as the daemon would parse it uncommented.
func contribClass(t *testing.T) (name, address string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(contribDir, "config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	_, example, ok := strings.Cut(string(data), "\n# [[class]]\n")
	if !ok {
		t.Fatal("contrib/config.toml shows no commented [[class]]")
	}
	text := "[[class]]\n"
	for line := range strings.Lines(example) {
		l, ok := strings.CutPrefix(line, "# ")
		if !ok {
			break
		}
		text += l
	}
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		t.Fatalf("contrib/config.toml's class, uncommented: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("contrib/config.toml's class, uncommented: %v", err)
	}
	return cfg.Classes[0].Name, cfg.ClassAddress(0)
}

func TestContribContainerdConfigs(t *testing.T) {
	class, classAddress := contribClass(t)
	for _, tt := range []struct {
		file    string
		version int
	}{
		{"config-v3.toml", 3},
		{"config-v4.toml", 4},
	} {
		t.Run(tt.file, func(t *testing.T) {
			c := loadContainerdConfig(t, tt.file)
			if c.Version != tt.version {
				t.Errorf("version = %d, want %d", c.Version, tt.version)
			}
			pp, ok := c.ProxyPlugins["thin"]
			if !ok || pp.Type != "snapshot" || pp.Address != config.DefaultAddress {
				t.Errorf("proxy_plugins.thin = %+v (present %v), want type snapshot at %s", pp, ok, config.DefaultAddress)
			}
			imageFS := imagefs.Dir(config.DefaultRoot)
			if root := pp.Exports["root"]; root != imageFS {
				t.Errorf("proxy_plugins.thin.exports.root = %q, want %s (CRI's image filesystem, the mirror's mount point)", root, imageFS)
			}
			// Both snapshotters on both platforms.
			have := map[string]bool{}
			for _, u := range c.Plugins.Transfer.UnpackConfig {
				if u.Differ != "walking" {
					t.Errorf("unpack_config entry %+v", u)
				}
				have[u.Platform+" "+u.Snapshotter] = true
			}
			for _, p := range []string{"linux/amd64", "linux/arm64"} {
				for _, sn := range []string{"thin", "overlayfs"} {
					if !have[p+" "+sn] {
						t.Errorf("unpack_config %+v lacks %s on %s", c.Plugins.Transfer.UnpackConfig, sn, p)
					}
				}
			}
			// CRI's default stays overlayfs; runtime handlers put pods on
			// thin, and the image service knows them (pulls, image fs).
			if c.Plugins.CRIImages.Snapshotter != "" {
				t.Errorf("CRI images snapshotter = %q, want the default", c.Plugins.CRIImages.Snapshotter)
			}
			runtimes := c.Plugins.CRIRuntime.Containerd.Runtimes
			for name, want := range map[string]string{"runc-thin": "io.containerd.runc.v2", "kata-thin": "io.containerd.kata.v2"} {
				rt, ok := runtimes[name]
				if !ok || rt.Type != want || rt.Snapshotter != "thin" {
					t.Errorf("runtime handler %s = %+v (present %v), want %s on thin", name, rt, ok, want)
				}
				if rp := c.Plugins.CRIImages.RuntimePlatforms[name]; rp.Snapshotter != "thin" {
					t.Errorf("runtime_platforms.%s = %+v, want snapshotter thin", name, rp)
				}
			}
			// The size class of contrib/config.toml: its proxy plugin on
			// its socket and the daemon's root, and a runc handler on it.
			pp, ok = c.ProxyPlugins[class]
			if !ok || pp.Type != "snapshot" || pp.Address != classAddress || pp.Exports["root"] != imageFS {
				t.Errorf("proxy_plugins.%s = %+v (present %v), want type snapshot at %s, root %s", class, pp, ok, classAddress, imageFS)
			}
			handler := "runc-" + class
			if rt, ok := runtimes[handler]; !ok || rt.Type != "io.containerd.runc.v2" || rt.Snapshotter != class {
				t.Errorf("runtime handler %s = %+v (present %v), want runc on %s", handler, rt, ok, class)
			}
			if rp := c.Plugins.CRIImages.RuntimePlatforms[handler]; rp.Snapshotter != class {
				t.Errorf("runtime_platforms.%s = %+v, want snapshotter %s", handler, rp, class)
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
