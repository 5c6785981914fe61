package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	adminv1 "github.com/thin-snapshotter/thin-snapshotter/proto/thin/admin/v1"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// snapshotterFactory opens the snapshotter that the daemon serves. The
// daemon closes it on shutdown.
type snapshotterFactory func(ctx context.Context, cfg *config.Config) (snapshots.Snapshotter, error)

// serveOptions are what tests change about serve; defaultServeOptions are
// the daemon's.
type serveOptions struct {
	// notify sends a state to the service manager (sd_notify).
	notify func(state string) error
	// shutdownTimeout bounds how long in-flight calls may run after a stop
	// signal before the remaining connections are closed.
	shutdownTimeout time.Duration
}

func defaultServeOptions() serveOptions {
	return serveOptions{
		notify: func(state string) error {
			_, err := daemon.SdNotify(false, state)
			return err
		},
		// Below systemd's default TimeoutStopSec (90s), so we close the
		// database ourselves instead of being killed.
		shutdownTimeout: 30 * time.Second,
	}
}

const (
	lockFileName = "thin-snapshotter.lock"
	rootDirMode  = 0o700
	sockDirMode  = 0o700
	sockMode     = 0o660
	dialTimeout  = time.Second
)

// serve runs the daemon until ctx is cancelled: it takes the root, listens
// on the sockets, starts the metrics endpoint, opens the snapshotter and
// serves containerd's snapshots API. On cancellation it stops accepting,
// lets in-flight calls finish (bounded by opts.shutdownTimeout) and closes
// the snapshotter. Devices are left as they are: the next start reuses them.
func serve(ctx context.Context, cfg *config.Config, open snapshotterFactory, opts serveOptions) (retErr error) {
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log_level: %w: %w", errdefs.ErrInvalidArgument, err)
	}
	logger := log.G(ctx).WithField("root", cfg.Root).WithField("address", cfg.Address)
	ctx = log.WithLogger(ctx, logger)

	unlock, err := takeRoot(cfg.Root)
	if err != nil {
		return err
	}
	defer unlock()

	socks, err := listenAll(ctx, cfg)
	if err != nil {
		return err
	}
	defer socks.closeUnlessServed()

	var m *metrics
	if cfg.MetricsAddress != "" {
		if m, err = startMetrics(ctx, cfg.MetricsAddress); err != nil {
			return err
		}
		defer m.shutdown(ctx)
	}

	sn, err := openForServing(ctx, cfg, open, m)
	if err != nil {
		return err
	}
	skipClose := false
	defer func() {
		if skipClose {
			return
		}
		if err := closeSnapshotter(ctx, sn); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()

	srvs, err := startServing(ctx, cfg, sn, m, socks)
	if err != nil {
		return err
	}
	// Pod disk sizes (nri.go); stopped before the snapshotter closes.
	nri := startNRI(ctx, cfg.NRI, sn, m)
	defer nri.stop(ctx, opts.shutdownTimeout)
	logger.Info("serving containerd snapshots API")
	if err := opts.notify(daemon.SdNotifyReady); err != nil {
		logger.WithError(err).Warn("sd_notify READY failed")
	}

	if err := srvs.waitForStop(ctx); err != nil {
		return err
	}
	if err := opts.notify(daemon.SdNotifyStopping); err != nil {
		logger.WithError(err).Warn("sd_notify STOPPING failed")
	}
	if !srvs.drain(ctx, opts.shutdownTimeout) {
		// A call stuck in the snapshotter may hold the database, so
		// closing the snapshotter could hang. Exiting without Close loses
		// nothing: committed transactions are on disk already.
		skipClose = true
		return fmt.Errorf("calls still running %s after the stop signal; exiting without closing the snapshotter: %w",
			2*opts.shutdownTimeout, context.DeadlineExceeded)
	}
	return nil
}

// takeRoot creates the root directory when it is missing and locks it, so
// that a second daemon on the same root fails at once. The caller calls
// unlock when the daemon stops.
func takeRoot(root string) (unlock func(), err error) {
	if err := os.MkdirAll(root, rootDirMode); err != nil {
		return nil, fmt.Errorf("creating root: %w", err)
	}
	return lockRoot(root)
}

// sockets are the daemon's listeners: the main socket and one per size
// class (classes[i] serves cfg.Classes[i]).
type sockets struct {
	main    net.Listener
	classes []net.Listener
	// served is set once the gRPC servers own the listeners: from then on
	// they close them.
	served bool
}

// listenAll listens on the main socket and on every size class's socket.
// Every socket is taken before the snapshotter opens, so that a busy or
// bad address fails the start early.
func listenAll(ctx context.Context, cfg *config.Config) (*sockets, error) {
	l, err := listenUnix(ctx, cfg.Address)
	if err != nil {
		return nil, err
	}
	s := &sockets{main: l, classes: make([]net.Listener, len(cfg.Classes))}
	for i := range cfg.Classes {
		if s.classes[i], err = listenUnix(ctx, cfg.ClassAddress(i)); err != nil {
			s.closeUnlessServed()
			return nil, fmt.Errorf("class %s: %w", cfg.Classes[i].Name, err)
		}
	}
	return s, nil
}

// closeUnlessServed closes the listeners that no gRPC server owns yet.
// Closing a unix listener also removes its socket file.
func (s *sockets) closeUnlessServed() {
	if s.served {
		return
	}
	for _, cl := range s.classes {
		if cl != nil {
			cl.Close()
		}
	}
	s.main.Close()
}

// openForServing logs which pool the configuration selects, opens the
// snapshotter and, when m is not nil, exports the snapshotter's metrics.
// Metrics that cannot be registered are logged, not returned: the daemon
// serves without them.
func openForServing(ctx context.Context, cfg *config.Config, open snapshotterFactory, m *metrics) (snapshots.Snapshotter, error) {
	logger := log.G(ctx)
	switch {
	case cfg.Pool.LVM != "":
		logger.WithField("pool", cfg.Pool.LVM).Info("using existing LVM thin pool")
	case cfg.Pool.Name == "":
		logger.Warn("no [pool] name configured: using the embedded loopback pool under root; loopback pools are for development and trials, use an existing thin pool (e.g. LVM) in production")
	default:
		logger.WithField("pool", cfg.Pool.Name).Info("using existing thin pool")
	}
	sn, err := open(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("opening snapshotter: %w", err)
	}
	if m != nil {
		if err := m.watch(sn); err != nil {
			logger.WithError(err).Warn("metrics without the pool's")
		}
		if err := m.watchSnapshotter(sn); err != nil {
			logger.WithError(err).Warn("metrics without the snapshotter's own counters")
		}
	}
	return sn, nil
}

// closeSnapshotter closes sn and logs the outcome.
func closeSnapshotter(ctx context.Context, sn snapshots.Snapshotter) error {
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing snapshotter")
		return fmt.Errorf("closing snapshotter: %w", err)
	}
	log.G(ctx).Info("snapshotter closed")
	return nil
}

// servers are the gRPC servers of the main socket (all[0]) and of the size
// classes (all[1:]), and the channel on which each one's Serve returns.
type servers struct {
	all      []*grpc.Server
	serveErr chan error
}

// startServing serves sn on the main socket and each size class's
// snapshotter on the class's socket. From here on the servers own the
// listeners.
func startServing(ctx context.Context, cfg *config.Config, sn snapshots.Snapshotter, m *metrics, socks *sockets) (*servers, error) {
	classes, err := classSnapshotters(sn, cfg)
	if err != nil {
		return nil, err
	}
	s := &servers{all: []*grpc.Server{newServer(sn, m)}}
	for _, c := range classes {
		s.all = append(s.all, newServer(c, m))
	}
	s.serveErr = make(chan error, len(s.all))
	socks.served = true
	go func() { s.serveErr <- s.all[0].Serve(socks.main) }()
	for i, cl := range socks.classes {
		go func() { s.serveErr <- s.all[i+1].Serve(cl) }()
		log.G(ctx).WithField("class", cfg.Classes[i].Name).WithField("class_address", cfg.ClassAddress(i)).
			WithField("size", cfg.Classes[i].Size).Info("serving size class")
	}
	return s, nil
}

// waitForStop returns nil when ctx is cancelled. When a server stops
// accepting first, which Serve only does when accepting fails, it stops
// every server and returns that error.
func (s *servers) waitForStop(ctx context.Context) error {
	select {
	case <-ctx.Done():
		log.G(ctx).Info("stopping: waiting for in-flight calls")
		return nil
	case err := <-s.serveErr:
		for _, srv := range s.all {
			srv.Stop()
		}
		for range len(s.all) - 1 {
			<-s.serveErr
		}
		return fmt.Errorf("serving: %w", err)
	}
}

// drain stops every server gracefully, all at once and each within the
// same bounds (see stopGracefully). It reports whether every call
// returned.
func (s *servers) drain(ctx context.Context, timeout time.Duration) bool {
	drainedAll := make(chan bool, len(s.all))
	for _, srv := range s.all {
		go func() { drainedAll <- stopGracefully(ctx, srv, timeout) }()
	}
	drained := true
	for range s.all {
		drained = <-drainedAll && drained
		<-s.serveErr
	}
	return drained
}

// classSnapshotters are the snapshotters of cfg's size classes on sn.
func classSnapshotters(sn snapshots.Snapshotter, cfg *config.Config) ([]snapshots.Snapshotter, error) {
	if len(cfg.Classes) == 0 {
		return nil, nil
	}
	c, ok := sn.(interface {
		Class(name string) (*snapshotter.Class, error)
	})
	if !ok {
		return nil, fmt.Errorf("size classes configured but the snapshotter has none: %w", errdefs.ErrNotImplemented)
	}
	var out []snapshots.Snapshotter
	for _, cl := range cfg.Classes {
		s, err := c.Class(cl.Name)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// newServer serves sn's snapshots API, and the admin API when sn has it;
// m, when not nil, counts the calls.
func newServer(sn snapshots.Snapshotter, m *metrics) *grpc.Server {
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	if m != nil {
		unary, stream = append(unary, m.unary), append(stream, m.stream)
	}
	// The error interceptors come last, innermost, so that the metrics
	// count the gRPC codes they convert errors to.
	unary, stream = append(unary, unaryErrors), append(stream, streamErrors)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	if a, ok := sn.(adminBackend); ok {
		adminv1.RegisterAdminServer(srv, &adminServer{sn: a})
	}
	return srv
}

// unaryErrors and streamErrors give every error leaving a handler the gRPC
// code of its errdefs kind, so the client sees the kind the snapshotter
// returned. containerd's snapshot service converts most errors itself but
// not all: List returns Walk's as it is, which would arrive as Unknown.
// Errors already converted pass through unchanged.
func unaryErrors(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	return resp, errgrpc.ToGRPC(err)
}

func streamErrors(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return errgrpc.ToGRPC(handler(srv, ss))
}

// stopGracefully stops accepting and waits up to timeout for in-flight
// calls. Then it closes the connections and cancels the calls' contexts,
// and waits up to timeout again for the handlers to return. It reports
// whether every handler returned.
func stopGracefully(ctx context.Context, srv *grpc.Server, timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		// GracefulStop returns once every handler has returned, also when
		// Stop below cuts it short.
		srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
	}
	log.G(ctx).Warnf("in-flight calls still running after %s: closing connections and cancelling them", timeout)
	srv.Stop()
	t.Reset(timeout)
	select {
	case <-done:
		return true
	case <-t.C:
		log.G(ctx).Errorf("calls still running %s after cancellation", timeout)
		return false
	}
}

// lockRoot takes an exclusive lock on the root so a second daemon on the
// same root fails at once with a clear error instead of waiting on the
// database. The lock dies with the process; the file stays.
func lockRoot(root string) (unlock func(), err error) {
	path := filepath.Join(root, lockFileName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			owner := "another process"
			if b, rerr := os.ReadFile(path); rerr == nil {
				if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil {
					owner = fmt.Sprintf("process %d", pid)
				}
			}
			return nil, fmt.Errorf("root %s is in use by another thin-snapshotter (%s holds %s): %w",
				root, owner, path, errdefs.ErrUnavailable)
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	// The pid only serves the error message above, for a second daemon.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
}

// listenUnix listens on the socket path: it creates a missing directory
// with mode 0700, removes a stale socket nobody listens on, refuses a live
// one or a non-socket file, and sets mode 0660 on the socket.
func listenUnix(ctx context.Context, path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, sockDirMode); err != nil {
			return nil, fmt.Errorf("creating socket directory: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}

	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("address %s exists and is not a socket (%s); refusing to remove it: %w",
				path, fi.Mode().Type(), errdefs.ErrAlreadyExists)
		}
		conn, err := net.DialTimeout("unix", path, dialTimeout)
		switch {
		case err == nil:
			conn.Close()
			return nil, fmt.Errorf("address %s is in use: another process is listening on it: %w", path, errdefs.ErrAlreadyExists)
		case errors.Is(err, syscall.ECONNREFUSED):
			log.G(ctx).Infof("removing stale socket %s", path)
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("removing stale socket: %w", err)
			}
		default:
			return nil, fmt.Errorf("checking existing socket %s: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("checking address: %w", err)
	}

	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, sockMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("setting socket mode: %w", err)
	}
	return l, nil
}
