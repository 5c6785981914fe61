package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/podsize"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

const (
	// nriPluginName is the plugin's name in NRI (and in the default
	// validator's required-plugins annotation); nriPluginIndex orders it
	// among NRI's plugins, which does not matter to it: it adjusts nothing.
	nriPluginName  = "thin-snapshotter"
	nriPluginIndex = "10"
	// criNamespace is the containerd namespace of CRI's containers, whose
	// snapshots' keys start with it; NRI serves only CRI.
	criNamespace = "k8s.io"
	// nriRetry is how often the plugin looks for the socket, or tries to
	// register again, while it is not registered: soon after containerd
	// (re)starts, pods are created.
	nriRetry = 250 * time.Millisecond
	// nriReplyMargin: a grow still running this long before NRI's
	// deadline goes on without the reply; NRI drops a plugin that misses
	// its deadline.
	nriReplyMargin = 250 * time.Millisecond
)

// containerSizer is what the plugin needs of the snapshotter
// (snapshotter.Snapshotter).
type containerSizer interface {
	FindContainer(ctx context.Context, ns, id string) (snapshotter.ContainerSnapshot, error)
	GrowContainer(ctx context.Context, key string, size uint64) (uint64, error)
}

// nriPlugin applies the disk sizes pods ask for (package podsize) to their
// containers on thin: registered with containerd's NRI, it grows each new
// container's root filesystem snapshot before the container starts.
type nriPlugin struct {
	sizer     containerSizer
	socket    string
	connected atomic.Bool
	metrics   *nriMetrics

	// mu guards stopping and the adding to grows: once stop waits, no
	// grow starts.
	mu       sync.Mutex
	stopping bool
	// grows are the grows in flight, which may outlive NRI's request.
	grows sync.WaitGroup

	// cancel ends run, which closes done when it returns.
	cancel context.CancelFunc
	done   chan struct{}
}

// startNRI starts the plugin's goroutine when the configuration enables it
// and sn can size containers, and exports its metrics on m when m is not
// nil; it returns nil otherwise (stop on nil does nothing).
func startNRI(ctx context.Context, cfg config.NRIConfig, sn any, m *metrics) *nriPlugin {
	logger := log.G(ctx).WithField("nri_socket", cfg.SocketPath)
	if !cfg.Enable {
		logger.Info("nri: off (nri.enable = false): pod disk size annotations are ignored")
		return nil
	}
	sizer, ok := sn.(containerSizer)
	if !ok {
		logger.Warn("nri: the snapshotter cannot size containers: pod disk size annotations are ignored")
		return nil
	}
	ctx, cancel := context.WithCancel(log.WithLogger(ctx, logger))
	p := &nriPlugin{sizer: sizer, socket: cfg.SocketPath, metrics: newNRIMetrics(), cancel: cancel, done: make(chan struct{})}
	if m != nil {
		if err := m.watchNRI(p); err != nil {
			logger.WithError(err).Warn("metrics without the NRI plugin's")
		}
	}
	go p.run(ctx)
	return p
}

// stop unregisters the plugin, then waits up to timeout for the grows in
// flight.
func (p *nriPlugin) stop(ctx context.Context, timeout time.Duration) {
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
	p.mu.Lock()
	p.stopping = true
	p.mu.Unlock()
	idle := make(chan struct{})
	go func() {
		p.grows.Wait()
		close(idle)
	}()
	select {
	case <-idle:
	case <-time.After(timeout):
		log.G(ctx).Warnf("nri: container grows still running %s after the stop signal", timeout)
	}
}

// run keeps the plugin registered with NRI until ctx ends: it waits for the
// socket, registers, serves NRI's requests, and starts over when the
// connection closes (containerd stopped). It logs each change of state
// once.
func (p *nriPlugin) run(ctx context.Context) {
	defer close(p.done)
	logger := log.G(ctx)
	last := ""
	note := func(state string, logf func()) {
		if state != last {
			logf()
			last = state
		}
	}
	for {
		if _, err := os.Stat(p.socket); err != nil {
			note("absent", func() {
				logger.WithError(err).Info("nri: no NRI socket (NRI off in containerd, or containerd not started): pod disk sizes wait for it")
			})
		} else if err := p.session(ctx, func() {
			note("connected", func() { logger.Info("nri: registered with containerd's NRI: applying pod disk sizes") })
		}); err != nil && ctx.Err() == nil {
			note("failed: "+err.Error(), func() { logger.WithError(err).Warn("nri: cannot register with containerd's NRI; retrying") })
		} else if ctx.Err() == nil {
			note("closed", func() { logger.Info("nri: the NRI connection closed (containerd stopped?); reconnecting") })
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(nriRetry):
		}
	}
}

// session registers with NRI and serves it until the connection closes or
// ctx ends; registered runs once NRI has configured the plugin.
func (p *nriPlugin) session(ctx context.Context, registered func()) error {
	st, err := stub.New(p,
		stub.WithPluginName(nriPluginName), stub.WithPluginIdx(nriPluginIndex),
		stub.WithSocketPath(p.socket), stub.WithLogger(nriLogger{log.G(ctx)}))
	if err != nil {
		return err
	}
	if err := st.Start(ctx); err != nil {
		return err
	}
	p.connected.Store(true)
	defer p.connected.Store(false)
	registered()
	closed := make(chan struct{})
	go func() {
		st.Wait()
		close(closed)
	}()
	select {
	case <-closed:
	case <-ctx.Done():
		st.Stop()
		<-closed
	}
	return nil
}

// CreateContainer grows the new container's root filesystem to the size
// its pod asks for (NRI's CreateContainer hook: the snapshot is prepared,
// not mounted). It adjusts nothing.
func (p *nriPlugin) CreateContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	return nil, nil, p.size(ctx, pod, ctr)
}

// Synchronize sizes, in the background, the containers that were created
// while the plugin was not registered and have not started: NRI sends the
// containers it has when a plugin registers, and one created just before
// (containerd restarting) missed its CreateContainer hook.
func (p *nriPlugin) Synchronize(ctx context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	byID := make(map[string]*api.PodSandbox, len(pods))
	for _, pod := range pods {
		byID[pod.GetId()] = pod
	}
	bg := context.WithoutCancel(ctx)
	for _, ctr := range ctrs {
		pod, ok := byID[ctr.GetPodSandboxId()]
		if !ok || ctr.GetState() != api.ContainerState_CONTAINER_CREATED {
			continue
		}
		p.goTracked(func() {
			if err := p.size(bg, pod, ctr); err != nil {
				log.G(ctx).WithError(err).Warn("nri: sizing a container created while not registered")
			}
		})
	}
	return nil, nil
}

// size grows ctr's root filesystem snapshot to the size its pod asks for.
// Containers of other snapshotters and pods that ask for nothing are left
// alone. It returns when the grow is done, or shortly before ctx's
// deadline: then the grow goes on, and the container's Mounts waits for
// it.
func (p *nriPlugin) size(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	req, ok := podsize.Find(pod.GetAnnotations(), ctr.GetName())
	if !ok {
		return nil
	}
	start := time.Now()
	who := fmt.Sprintf("container %s (%s) of pod %s/%s", ctr.GetName(), ctr.GetId(), pod.GetNamespace(), pod.GetName())
	logger := log.G(ctx).WithField("container", ctr.GetId()).WithField("annotation", req.Key)
	snap, err := p.sizer.FindContainer(ctx, criNamespace, ctr.GetId())
	if errdefs.IsNotFound(err) {
		logger.Debug("nri: the container is not on thin: its pod's disk size is not ours to apply")
		return nil
	}
	if err != nil {
		p.metrics.result(nriFailed)
		return fmt.Errorf("%s: %w", who, err)
	}
	size, err := req.Size()
	if err != nil {
		p.metrics.result(nriRefused)
		logger.WithError(err).Warn("nri: refusing the container: bad disk size")
		return fmt.Errorf("%s: %w", who, err)
	}
	done, err := p.grow(ctx, snap, size, func(got uint64, err error) {
		p.report(logger, start, snap, size, got, err)
	})
	if err != nil {
		return fmt.Errorf("%s: %w", who, err)
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%s: %s: %w", who, req.Key, err)
		}
		return nil
	case <-replyBy(ctx):
		logger.Warnf("nri: the grow runs past NRI's deadline less %s: answering now; the container's start waits for it", nriReplyMargin)
		return nil
	}
}

// grow starts growing snap to size in the background, with a context NRI's
// deadline does not cancel (a grow cut short leaves the filesystem
// smaller than its device until the next try), and calls report when it
// ends. done then carries its error.
func (p *nriPlugin) grow(ctx context.Context, snap snapshotter.ContainerSnapshot, size uint64, report func(uint64, error)) (<-chan error, error) {
	done := make(chan error, 1)
	if !p.goTracked(func() {
		got, err := p.sizer.GrowContainer(context.WithoutCancel(ctx), snap.Key, size)
		report(got, err)
		done <- err
	}) {
		return nil, fmt.Errorf("thin-snapshotter is stopping: %w", errdefs.ErrUnavailable)
	}
	return done, nil
}

// goTracked runs fn in a goroutine that stop waits for; it reports false,
// and does not run fn, once stop has begun.
func (p *nriPlugin) goTracked(fn func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		return false
	}
	p.grows.Go(fn)
	return true
}

// report logs and counts the outcome of a grow from snap.Size towards
// size, which took since start.
func (p *nriPlugin) report(logger *log.Entry, start time.Time, snap snapshotter.ContainerSnapshot, size, got uint64, err error) {
	took := time.Since(start)
	logger = logger.WithField("class", snap.Class).WithField("from", snap.Size).WithField("asked", size).WithField("took", took.Round(time.Millisecond))
	switch {
	case err != nil:
		p.metrics.result(nriFailed)
		logger.WithError(err).Error("nri: growing the container's root filesystem failed")
	case got > snap.Size:
		p.metrics.result(nriGrown)
		p.metrics.growSeconds.Observe(took.Seconds())
		logger.WithField("size", got).Info("nri: grew the container's root filesystem to its pod's disk size")
	default:
		p.metrics.result(nriKept)
		logger.WithField("size", got).Info("nri: kept the container's root filesystem at its size, at least what its pod asks (its size class, base_size or an earlier grow)")
	}
}

// replyBy fires nriReplyMargin before ctx's deadline; never without one.
func replyBy(ctx context.Context) <-chan time.Time {
	dl, ok := ctx.Deadline()
	if !ok {
		return nil
	}
	return time.After(time.Until(dl) - nriReplyMargin)
}

// nriLogger passes the NRI stub's messages to the daemon's log. Its
// progress messages are debug: run logs each change of state itself.
type nriLogger struct{ l *log.Entry }

func (n nriLogger) Debugf(_ context.Context, format string, args ...any) {
	n.l.Debugf("nri stub: "+format, args...)
}

func (n nriLogger) Infof(_ context.Context, format string, args ...any) {
	n.l.Debugf("nri stub: "+format, args...)
}

func (n nriLogger) Warnf(_ context.Context, format string, args ...any) {
	n.l.Warnf("nri stub: "+format, args...)
}

func (n nriLogger) Errorf(_ context.Context, format string, args ...any) {
	n.l.Errorf("nri stub: "+format, args...)
}
