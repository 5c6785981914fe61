package main

import (
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// containerdNRI is containerd 2.4's [plugins."io.containerd.nri.v1.nri"]
// table, the keys the contrib files set.
type containerdNRI struct {
	Disable              bool   `toml:"disable"`
	SocketPath           string `toml:"socket_path"`
	PluginRequestTimeout string `toml:"plugin_request_timeout"`
}

// The contrib files keep NRI on, at the socket the daemon dials by default,
// with a request timeout longer than NRI's default 2s.
func TestContribContainerdNRI(t *testing.T) {
	for _, file := range []string{"config-v3.toml", "config-v4.toml"} {
		t.Run(file, func(t *testing.T) {
			nri := loadContainerdConfig(t, file).Plugins.NRI
			if nri.Disable {
				t.Error("NRI is disabled: pod disk sizes need it")
			}
			if nri.SocketPath != config.DefaultNRISocket {
				t.Errorf("socket_path = %q, want the daemon's default nri.socket_path %q", nri.SocketPath, config.DefaultNRISocket)
			}
			d, err := time.ParseDuration(nri.PluginRequestTimeout)
			if err != nil || d <= 2*time.Second || d >= time.Minute {
				t.Errorf("plugin_request_timeout = %q (%v): want more than NRI's default 2s and well under the kubelet's 2 minutes", nri.PluginRequestTimeout, err)
			}
		})
	}
}
