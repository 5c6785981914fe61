package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// daemon is a started background process logging to a file.
type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startDaemon(name, logPath string, env []string, bin string, args ...string) (*daemon, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		lf.Close()
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits; after timeout it kills the process.
func (d *daemon) stop(timeout time.Duration) error {
	if d.exited() {
		return fmt.Errorf("%s had already exited: %w", d.name, d.err)
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("%s did not stop within %s after SIGTERM; killed", d.name, timeout)
	}
}

// tail returns the last lines of the daemon's log.
func (d *daemon) tail(lines int) string {
	data, err := os.ReadFile(d.log)
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return fmt.Sprintf("--- last %d lines of %s:\n%s", len(all), d.log, strings.Join(all, "\n"))
}

func waitSocket(d *daemon, sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if d.exited() {
			return fmt.Errorf("%s exited before serving %s: %w\n%s", d.name, sock, d.err, d.tail(40))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not serve %s after %s: %w\n%s", d.name, sock, timeout, err, d.tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitReady waits for READY=1 from d on the notify socket: the daemon's word
// that its pool and base device are set up.
func waitReady(d *daemon, notify *net.UnixConn, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 4096)
	for {
		if err := notify.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
			return err
		}
		n, err := notify.Read(buf)
		if err == nil && slices.Contains(strings.Split(string(buf[:n]), "\n"), "READY=1") {
			return nil
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("notify socket: %w", err)
		}
		if d.exited() {
			return fmt.Errorf("%s exited before READY=1: %w\n%s", d.name, d.err, d.tail(40))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s sent no READY=1 within %s\n%s", d.name, timeout, d.tail(40))
		}
	}
}

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
	cfg := fmt.Sprintf(thinConfig, filepath.Join(b.dir, "thin"), sock, b.logLevel(), b.cfg.thinData, b.cfg.thinBase)
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
	b.thin, err = startDaemon("thin-snapshotter", filepath.Join(b.dir, "thin-snapshotter.log"),
		[]string{"NOTIFY_SOCKET=" + notifyPath}, b.cfg.thinBin, "--config", cfgPath)
	if err != nil {
		return err
	}
	if err := waitReady(b.thin, notify, 3*time.Minute); err != nil {
		return err
	}
	if err := waitSocket(b.thin, sock, time.Minute); err != nil {
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

const containerdThin = `
[proxy_plugins.thin]
  type = "snapshot"
  address = %q

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "thin"
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

func (b *bench) startContainerd(thinSock, root string, thin, devmapper bool) error {
	cfg := fmt.Sprintf(containerdConfig, root, filepath.Join(b.dir, "containerd", "state"), b.logLevel(), b.ctrdSock)
	if thin {
		cfg += fmt.Sprintf(containerdThin, thinSock)
	}
	if devmapper {
		// go-units reads "256MiB" as 256MiB too.
		cfg += fmt.Sprintf(containerdDevmapper, dmPoolName, filepath.Join(b.dir, "devmapper"), b.cfg.thinBase)
	}
	cfgPath := filepath.Join(b.dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	// containerd finds the shim, and the shim runc, in PATH.
	path := "PATH=" + b.cfg.ctrdDir + ":" + os.Getenv("PATH")
	var err error
	b.ctrd, err = startDaemon("containerd", filepath.Join(b.dir, "containerd.log"), []string{path},
		filepath.Join(b.cfg.ctrdDir, "containerd"), "--config", cfgPath)
	if err != nil {
		return err
	}
	return waitSocket(b.ctrd, b.ctrdSock, 3*time.Minute)
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
