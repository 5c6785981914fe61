package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/podsize"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// fakeSizer stands in for the snapshotter: containers it knows are on
// thin, at their size; it records the grows.
type fakeSizer struct {
	mu    sync.Mutex
	snaps map[string]snapshotter.ContainerSnapshot // by container id
	grows []string                                 // "key size"
	// grow, when set, runs in GrowContainer (with mu not held).
	grow func(key string, size uint64) error
}

func (f *fakeSizer) FindContainer(_ context.Context, ns, id string) (snapshotter.ContainerSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	snap, ok := f.snaps[id]
	if !ok || ns != criNamespace {
		return snapshotter.ContainerSnapshot{}, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return snap, nil
}

func (f *fakeSizer) GrowContainer(_ context.Context, key string, size uint64) (uint64, error) {
	if f.grow != nil {
		if err := f.grow(key, size); err != nil {
			return 0, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.grows = append(f.grows, fmt.Sprintf("%s %d", key, size))
	for id, snap := range f.snaps {
		if snap.Key == key && size > snap.Size {
			snap.Size = size
			f.snaps[id] = snap
		}
	}
	return f.snaps[strings.TrimPrefix(key, "k8s.io/1/")].Size, nil
}

func (f *fakeSizer) grown() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.grows...)
}

// fakeRuntime is containerd's side of NRI: the NRI library's own runtime
// adaptation. pods and ctrs are what it reports to a plugin that
// registers. It listens on a socket of its own behind a proxy on the
// plugin's socket: stopping it stops the proxy too, which closes the
// plugins' connections as containerd's exit does.
type fakeRuntime struct {
	*adaptation.Adaptation
	pods []*api.PodSandbox
	ctrs []*api.Container

	proxy net.Listener
	mu    sync.Mutex
	conns []net.Conn
	// registered counts the plugins the runtime has taken in.
	registered atomic.Int32
}

// The runtime's metrics tell when it has taken a plugin in.
func (r *fakeRuntime) RecordPluginInvocation(string, string, error)      {}
func (r *fakeRuntime) RecordPluginLatency(string, string, time.Duration) {}
func (r *fakeRuntime) UpdatePluginCount(n int)                           { r.registered.Store(int32(n)) }
func (r *fakeRuntime) RecordPluginAdjustments(string, string, *adaptation.ContainerAdjustment, int, int) {
}

// waitRegistered waits until the runtime sends its requests to one plugin.
func (r *fakeRuntime) waitRegistered(t *testing.T) {
	t.Helper()
	waitFor(t, "the plugin registered", func() bool { return r.registered.Load() == 1 })
}

func startRuntime(t *testing.T, socket string, pods []*api.PodSandbox, ctrs []*api.Container) *fakeRuntime {
	t.Helper()
	r := &fakeRuntime{pods: pods, ctrs: ctrs}
	dir := shortTempDir(t)
	inner := filepath.Join(dir, "runtime.sock")
	var err error
	r.Adaptation, err = adaptation.New("containerd", "v2.4.2",
		func(ctx context.Context, cb adaptation.SyncCB) error {
			_, err := cb(ctx, r.pods, r.ctrs)
			return err
		},
		func(context.Context, []*adaptation.ContainerUpdate) ([]*adaptation.ContainerUpdate, error) {
			return nil, nil
		},
		adaptation.WithSocketPath(inner), adaptation.WithPluginPath(dir), adaptation.WithPluginConfigPath(dir),
		adaptation.WithMetrics(r))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if r.proxy, err = net.Listen("unix", socket); err != nil {
		t.Fatal(err)
	}
	go r.forward(inner)
	return r
}

// forward passes each connection to the proxy on to the runtime's socket.
func (r *fakeRuntime) forward(inner string) {
	for {
		c, err := r.proxy.Accept()
		if err != nil {
			return
		}
		d, err := net.Dial("unix", inner)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, c, d)
		r.mu.Unlock()
		go func() { _, _ = io.Copy(d, c); d.Close() }()
		go func() { _, _ = io.Copy(c, d); c.Close() }()
	}
}

// Stop stops the runtime as containerd's exit would: its socket goes and
// its plugins' connections close.
func (r *fakeRuntime) Stop() {
	r.proxy.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.Adaptation.Stop()
}

func (r *fakeRuntime) create(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	_, err := r.CreateContainer(ctx, &adaptation.CreateContainerRequest{Pod: pod, Container: ctr})
	return err
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after 10s", what)
		}
	}
}

func pod(annotations map[string]string) *api.PodSandbox {
	return &api.PodSandbox{Id: "pod-1", Name: "web", Namespace: "team", Annotations: annotations}
}

func ctr(id, name string) *api.Container {
	return &api.Container{Id: id, PodSandboxId: "pod-1", Name: name, State: api.ContainerState_CONTAINER_CREATED}
}

// TestNRIPlugin: through NRI's own runtime side, a container on thin
// grows to its pod's size before CreateContainer returns; other pods and
// containers are left alone; a bad value fails the creation with the
// annotation's name.
func TestNRIPlugin(t *testing.T) {
	ctx := context.Background()
	socket := filepath.Join(shortTempDir(t), "nri.sock")
	sizer := &fakeSizer{snaps: map[string]snapshotter.ContainerSnapshot{}}
	for _, id := range []string{"app", "side", "bad", "fails", "small"} {
		sizer.snaps[id] = snapshotter.ContainerSnapshot{Key: "k8s.io/1/" + id, Size: 256 << 20}
	}
	rt := startRuntime(t, socket, nil, nil)
	defer rt.Stop()
	m := newMetrics()
	p := startNRI(ctx, config.NRIConfig{Enable: true, SocketPath: socket}, sizer, m)
	defer p.stop(ctx, time.Minute)
	waitFor(t, "registration", p.connected.Load)
	rt.waitRegistered(t)
	if v := testutil.ToFloat64(p.metrics.containers.WithLabelValues(nriGrown)); v != 0 {
		t.Fatalf("grown before any container: %v", v)
	}

	sizes := map[string]string{podsize.PodKey: "2Gi", podsize.ContainerKey("side"): "1Gi"}
	sizer.grow = func(key string, _ uint64) error {
		if key == "k8s.io/1/fails" {
			return errors.New("resize2fs: no space left on device")
		}
		return nil
	}
	for _, tc := range []struct {
		name        string
		pod         *api.PodSandbox
		ctr         *api.Container
		grows       []string
		errContains string
	}{
		{"the pod's size", pod(sizes), ctr("app", "app"), []string{"k8s.io/1/app 2147483648"}, ""},
		{"the container's own size", pod(sizes), ctr("side", "side"), []string{"k8s.io/1/side 1073741824"}, ""},
		{"no annotation", pod(nil), ctr("small", "app"), nil, ""},
		{"not on thin, whatever it asks", pod(map[string]string{podsize.PodKey: "lots"}), ctr("overlay", "app"), nil, ""},
		{"a bad value", pod(map[string]string{podsize.PodKey: "lots"}), ctr("bad", "app"), nil, `annotation disk-size.thin-snapshotter.io/pod="lots"`},
		{"a failed grow", pod(sizes), ctr("fails", "app"), nil, "no space left on device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(sizer.grown())
			err := rt.create(ctx, tc.pod, tc.ctr)
			if tc.errContains == "" && err != nil {
				t.Fatalf("CreateContainer: %v", err)
			}
			if tc.errContains != "" && (err == nil || !strings.Contains(err.Error(), tc.errContains) || !strings.Contains(err.Error(), "team/web")) {
				t.Fatalf("CreateContainer: %v; want an error naming the pod and saying %q", err, tc.errContains)
			}
			if got := sizer.grown()[before:]; fmt.Sprint(got) != fmt.Sprint(tc.grows) {
				t.Errorf("grows %q, want %q", got, tc.grows)
			}
		})
	}
	for r, want := range map[string]float64{nriGrown: 2, nriRefused: 1, nriFailed: 1, nriKept: 0} {
		if v := testutil.ToFloat64(p.metrics.containers.WithLabelValues(r)); v != want {
			t.Errorf("nri_containers_total{result=%q} = %v, want %v", r, v, want)
		}
	}
	if n, err := testutil.GatherAndCount(m.reg, "thin_snapshotter_nri_connected", "thin_snapshotter_nri_grow_duration_seconds"); err != nil || n != 2 {
		t.Errorf("exported NRI metrics: %d, %v; want the gauge and the histogram", n, err)
	}
}

// TestNRIPluginSlowGrow: a grow that runs past NRI's deadline is answered
// before it, so NRI keeps the plugin, and it finishes afterwards; stop
// waits for it.
func TestNRIPluginSlowGrow(t *testing.T) {
	ctx := context.Background()
	adaptation.SetPluginRequestTimeout(time.Second)
	defer adaptation.SetPluginRequestTimeout(adaptation.DefaultPluginRequestTimeout)
	socket := filepath.Join(shortTempDir(t), "nri.sock")
	sizer := &fakeSizer{snaps: map[string]snapshotter.ContainerSnapshot{
		"slow": {Key: "k8s.io/1/slow", Size: 256 << 20},
		"next": {Key: "k8s.io/1/next", Size: 256 << 20},
	}}
	release := make(chan struct{})
	sizer.grow = func(key string, _ uint64) error {
		if key == "k8s.io/1/slow" {
			<-release
		}
		return nil
	}
	rt := startRuntime(t, socket, nil, nil)
	defer rt.Stop()
	p := startNRI(ctx, config.NRIConfig{Enable: true, SocketPath: socket}, sizer, nil)
	waitFor(t, "registration", p.connected.Load)
	rt.waitRegistered(t)

	sized := pod(map[string]string{podsize.PodKey: "2Gi"})
	start := time.Now()
	if err := rt.create(ctx, sized, ctr("slow", "app")); err != nil {
		t.Fatalf("CreateContainer with a slow grow: %v", err)
	}
	t.Logf("answered after %s with the grow still running", time.Since(start).Round(time.Millisecond))
	if g := sizer.grown(); len(g) != 0 {
		t.Fatalf("grows %q while the slow one is blocked", g)
	}
	// NRI kept the plugin: the next container is sized.
	if err := rt.create(ctx, sized, ctr("next", "app")); err != nil || len(sizer.grown()) != 1 {
		t.Fatalf("the next container: %v, grows %q", err, sizer.grown())
	}
	stopped := make(chan struct{})
	go func() {
		p.stop(ctx, time.Minute)
		close(stopped)
	}()
	select {
	case <-stopped:
		t.Fatal("stop returned with a grow in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	<-stopped
	if g := sizer.grown(); len(g) != 2 {
		t.Fatalf("grows %q after stop, want both", g)
	}
}

// TestNRIPluginReconnects: the plugin waits for the socket, registers when
// containerd's NRI appears, registers again after containerd restarts, and
// sizes a container created while it was away once it is back (NRI's
// synchronization), if it has not started.
func TestNRIPluginReconnects(t *testing.T) {
	ctx := context.Background()
	socket := filepath.Join(shortTempDir(t), "nri.sock")
	sizer := &fakeSizer{snaps: map[string]snapshotter.ContainerSnapshot{
		"first":   {Key: "k8s.io/1/first", Size: 256 << 20},
		"missed":  {Key: "k8s.io/1/missed", Size: 256 << 20},
		"running": {Key: "k8s.io/1/running", Size: 256 << 20},
	}}
	p := startNRI(ctx, config.NRIConfig{Enable: true, SocketPath: socket}, sizer, nil)
	defer p.stop(ctx, time.Minute)
	time.Sleep(3 * nriRetry)
	if p.connected.Load() {
		t.Fatal("registered without a socket")
	}

	sized := pod(map[string]string{podsize.PodKey: "2Gi"})
	rt := startRuntime(t, socket, nil, nil)
	waitFor(t, "registration once the socket appears", p.connected.Load)
	rt.waitRegistered(t)
	if err := rt.create(ctx, sized, ctr("first", "app")); err != nil || len(sizer.grown()) != 1 {
		t.Fatalf("first container: %v, grows %q", err, sizer.grown())
	}

	rt.Stop()
	waitFor(t, "the closed connection noticed", func() bool { return !p.connected.Load() })
	running := ctr("running", "app")
	running.State = api.ContainerState_CONTAINER_RUNNING
	rt = startRuntime(t, socket, []*api.PodSandbox{sized}, []*api.Container{ctr("missed", "app"), running})
	defer rt.Stop()
	waitFor(t, "registration after the restart", p.connected.Load)
	waitFor(t, "the missed container sized", func() bool { return len(sizer.grown()) == 2 })
	if g := sizer.grown(); g[1] != "k8s.io/1/missed 2147483648" {
		t.Errorf("grows %q: want the created container, not the running one", g)
	}
}

// TestNRIPluginOff: with nri.enable false, or a snapshotter that cannot size
// containers, nothing registers.
func TestNRIPluginOff(t *testing.T) {
	ctx := context.Background()
	socket := filepath.Join(shortTempDir(t), "nri.sock")
	rt := startRuntime(t, socket, nil, nil)
	defer rt.Stop()
	if p := startNRI(ctx, config.NRIConfig{Enable: false, SocketPath: socket}, &fakeSizer{}, nil); p != nil {
		t.Error("a plugin started with nri.enable = false")
	}
	if p := startNRI(ctx, config.NRIConfig{Enable: true, SocketPath: socket}, struct{}{}, nil); p != nil {
		t.Error("a plugin started for a snapshotter that cannot size containers")
	}
	// stop on no plugin is a no-op.
	var p *nriPlugin
	p.stop(ctx, time.Second)
}
