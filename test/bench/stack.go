package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/internal/daemontest"
)

// run runs a command and returns its combined output; errors carry it.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// dmPool is a thin pool on two loop devices over sparse files, made with
// losetup and dmsetup, for containerd's devmapper snapshotter.
type dmPool struct {
	name               string
	metaLoop, dataLoop string
}

const sectorSize = 512

func createDMPool(ctx context.Context, dir, name string, dataSize, metaSize int64) (*dmPool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &dmPool{name: name}
	files := []struct {
		path string
		size int64
		loop *string
	}{
		{filepath.Join(dir, "metadata"), metaSize, &p.metaLoop},
		{filepath.Join(dir, "data"), dataSize, &p.dataLoop},
	}
	for _, f := range files {
		fh, err := os.Create(f.path)
		if err != nil {
			return nil, err
		}
		err = fh.Truncate(f.size)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		out, err := run(ctx, "losetup", "--find", "--show", f.path)
		if err != nil {
			return nil, err
		}
		*f.loop = strings.TrimSpace(out)
	}
	// 64KiB blocks, as the thin-snapshotter's embedded pool; no zeroing of
	// new blocks (both write whole file systems over them).
	table := fmt.Sprintf("0 %d thin-pool %s %s 128 32768 1 skip_block_zeroing", dataSize/sectorSize, p.metaLoop, p.dataLoop)
	if _, err := run(ctx, "dmsetup", "create", name, "--table", table); err != nil {
		p.detach(ctx)
		return nil, err
	}
	return p, nil
}

func (p *dmPool) detach(ctx context.Context) {
	for _, l := range []string{p.metaLoop, p.dataLoop} {
		if l != "" {
			_, _ = run(ctx, "losetup", "-d", l)
		}
	}
}

// thinDevices counts the thin devices in the pool's metadata (base device
// included): thin_ls on a metadata snapshot of the live pool.
func (p *dmPool) thinDevices(ctx context.Context) (int, error) {
	if _, err := run(ctx, "dmsetup", "message", p.name, "0", "reserve_metadata_snap"); err != nil {
		return 0, err
	}
	out, lsErr := run(ctx, "thin_ls", "--metadata-snap", "--no-headers", "--format", "DEV", p.metaLoop)
	if _, err := run(ctx, "dmsetup", "message", p.name, "0", "release_metadata_snap"); err != nil && lsErr == nil {
		return 0, err
	}
	if lsErr != nil {
		return 0, lsErr
	}
	return len(strings.Fields(out)), nil
}

// dmDevices lists the names of the dm devices with the given target type.
func dmDevices(ctx context.Context, target string) ([]string, error) {
	out, err := run(ctx, "dmsetup", "ls", "--target", target)
	if err != nil {
		return nil, err
	}
	var names []string
	for l := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && strings.HasPrefix(f[1], "(") {
			names = append(names, f[0])
		}
	}
	return names, nil
}

// removeNewDevices removes the thin devices, then the pools, that were not
// there before (names in before), so a host with dm-thin is left as found.
func removeNewDevices(ctx context.Context, before map[string]bool) error {
	var errs []error
	for _, target := range []string{"thin", "thin-pool"} {
		names, err := dmDevices(ctx, target)
		if err != nil {
			return err
		}
		for _, n := range names {
			if before[n] {
				continue
			}
			if _, err := run(ctx, "dmsetup", "remove", n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func allDMDevices(ctx context.Context) (map[string]bool, error) {
	out, err := run(ctx, "dmsetup", "ls")
	if err != nil {
		return nil, err
	}
	m := map[string]bool{}
	for l := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && strings.HasPrefix(f[1], "(") {
			m[f[0]] = true
		}
	}
	return m, nil
}

// kernelRelease is uname -r, for the table's header.
func kernelRelease() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "unknown"
	}
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

const thinConfig = `root = %q
address = %q
log_level = %q
metrics_address = %q

[pool]
data_size = %q
metadata_size = '256MiB'

[snapshot]
base_size = %q
`

// startThin starts thin-snapshotter with its embedded loopback pool and
// waits until it serves.
func (b *bench) startThin(sock string) error {
	cfgPath := filepath.Join(b.dir, "thin.toml")
	var err error
	if b.thinMetrics, err = freeLocalAddr(); err != nil {
		return err
	}
	cfg := fmt.Sprintf(thinConfig, filepath.Join(b.dir, "thin"), sock, b.logLevel(), b.thinMetrics, b.cfg.thinData, b.cfg.thinBase)
	if b.cfg.thinSyncRemove {
		cfg += "async_remove = false\n"
	}
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	notifyPath := filepath.Join(b.dir, "thin-notify.sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		return err
	}
	// Kept open: the daemon also says STOPPING=1 at the end.
	start := time.Now()
	b.thin, err = daemontest.Start("thin-snapshotter", filepath.Join(b.dir, "thin-snapshotter.log"),
		[]string{"NOTIFY_SOCKET=" + notifyPath}, b.cfg.thinBin, "--config", cfgPath)
	if err != nil {
		return err
	}
	if err := b.thin.WaitReady(notify, 3*time.Minute); err != nil {
		return err
	}
	if err := b.thin.WaitSocket(sock, time.Minute); err != nil {
		return err
	}
	logf("thin-snapshotter ready after %s", time.Since(start).Round(time.Millisecond))
	return nil
}

// CRI is off: its snapshot syncer would call Usage on overlayfs (its
// default snapshotter) in the middle of the measurements.
const containerdConfig = `version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox"]

[debug]
  level = %q

[grpc]
  address = %q

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
`

const containerdProxy = `
[proxy_plugins.%q]
  type = "snapshot"
  address = %q

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = %q
  differ = "walking"
`

const containerdDevmapper = `
[plugins."io.containerd.snapshotter.v1.devmapper"]
  pool_name = %q
  root_path = %q
  base_image_size = %q
  async_remove = false

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "devmapper"
  differ = "walking"
`

// startContainerd starts containerd with proxies, snapshotter name to
// socket, and devmapper if asked.
func (b *bench) startContainerd(proxies map[string]string, root string, devmapper bool) error {
	var cfg strings.Builder
	fmt.Fprintf(&cfg, containerdConfig, root, filepath.Join(b.dir, "containerd", "state"), b.logLevel(), b.ctrdSock)
	for _, name := range slices.Sorted(maps.Keys(proxies)) {
		fmt.Fprintf(&cfg, containerdProxy, name, proxies[name], name)
	}
	if devmapper {
		// go-units reads "256MiB" as 256MiB too.
		fmt.Fprintf(&cfg, containerdDevmapper, dmPoolName, filepath.Join(b.dir, "devmapper"), b.cfg.thinBase)
	}
	cfgPath := filepath.Join(b.dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg.String()), 0o644); err != nil {
		return err
	}
	// containerd finds the shim, and the shim runc, in PATH.
	path := "PATH=" + b.cfg.ctrdDir + ":" + os.Getenv("PATH")
	var err error
	b.ctrd, err = daemontest.Start("containerd", filepath.Join(b.dir, "containerd.log"), []string{path},
		filepath.Join(b.cfg.ctrdDir, "containerd"), "--config", cfgPath)
	if err != nil {
		return err
	}
	return b.ctrd.WaitSocket(b.ctrdSock, 3*time.Minute)
}

// ctr runs containerd's ctr in the bench's namespace.
func (b *bench) ctr(ctx context.Context, args ...string) (string, error) {
	full := append([]string{"--address", b.ctrdSock, "--namespace", namespace}, args...)
	return run(ctx, filepath.Join(b.cfg.ctrdDir, "ctr"), full...)
}

func (b *bench) logLevel() string {
	if b.cfg.debug {
		return "debug"
	}
	return "info"
}
