// Package daemontest runs the daemons of the end-to-end tests and of the
// containerd benchmark (containerd, thin-snapshotter, a registry) as child
// processes with their output in a log file, and waits until they serve.
package daemontest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Daemon is a started background process logging to a file.
type Daemon struct {
	Name string
	Log  string // the log file's path
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start starts bin with args and env added to this process's environment,
// its output going to a new file at logPath.
func Start(name, logPath string, env []string, bin string, args ...string) (*Daemon, error) {
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
	d := &Daemon{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		lf.Close()
		close(d.done)
	}()
	return d, nil
}

// Exited reports whether the process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Err is the process's exit error, once Exited.
func (d *Daemon) Err() error {
	if !d.Exited() {
		return nil
	}
	return d.err
}

// Stop sends SIGTERM and waits; after timeout it kills the process.
func (d *Daemon) Stop(timeout time.Duration) error {
	if d.Exited() {
		return fmt.Errorf("%s had already exited: %w", d.Name, d.err)
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		d.Kill()
		return fmt.Errorf("%s did not stop within %s after SIGTERM; killed", d.Name, timeout)
	}
}

// Kill kills the process and waits for it.
func (d *Daemon) Kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

// Tail is the last lines of the log, headed by the daemon's name.
func (d *Daemon) Tail(lines int) string {
	data, err := os.ReadFile(d.Log)
	if err != nil {
		return fmt.Sprintf("%s log: %v", d.Name, err)
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return fmt.Sprintf("last %d lines of the %s log:\n%s", len(all), d.Name, strings.Join(all, "\n"))
}

// WaitSocket waits until the unix socket sock accepts connections; its
// error carries the end of the log.
func (d *Daemon) WaitSocket(sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			return c.Close()
		}
		if d.Exited() {
			return fmt.Errorf("%s exited before serving %s: %w\n%s", d.Name, sock, d.err, d.Tail(40))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not serve %s after %s: %w\n%s", d.Name, sock, timeout, err, d.Tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitReady waits for READY=1 on notify, the daemon's NOTIFY_SOCKET (its
// word that the pool and base device are set up); its error carries the end
// of the log.
func (d *Daemon) WaitReady(notify *net.UnixConn, timeout time.Duration) error {
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
		if d.Exited() {
			return fmt.Errorf("%s exited before READY=1: %w\n%s", d.Name, d.err, d.Tail(40))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s sent no READY=1 within %s\n%s", d.Name, timeout, d.Tail(40))
		}
	}
}
