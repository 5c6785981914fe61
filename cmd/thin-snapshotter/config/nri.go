package config

import nriapi "github.com/containerd/nri/pkg/api"

// NRIConfig is the [nri] table: per-pod disk sizes, applied by the daemon
// as a plugin of containerd's NRI (Node Resource Interface).
type NRIConfig struct {
	// Enable registers the daemon with NRI whenever SocketPath exists.
	Enable bool `toml:"enable"`
	// SocketPath is containerd's NRI socket
	// ([plugins."io.containerd.nri.v1.nri"] socket_path).
	SocketPath string `toml:"socket_path"`
}

// DefaultNRISocket is containerd's default NRI socket.
const DefaultNRISocket = nriapi.DefaultSocketPath

// defaultNRI is the [nri] table's default: on, at containerd's socket.
func defaultNRI() NRIConfig {
	return NRIConfig{Enable: true, SocketPath: DefaultNRISocket}
}

// validate reports the invalid [nri] values through bad.
func (c *NRIConfig) validate(bad func(key, format string, args ...any)) {
	if !c.Enable {
		return
	}
	if msg := checkSocketPath(c.SocketPath); msg != "" {
		bad("nri.socket_path", "%s", msg)
	}
}
