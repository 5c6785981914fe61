package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// metrics serves /metrics: the gRPC calls by method and status code, their
// latency and the Go runtime's metrics. Once watch (metrics_pool.go) is
// given the snapshotter, it also serves the pool's metrics and the latency
// of the snapshotter's kernel steps.
type metrics struct {
	reg      *prometheus.Registry
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	steps    *stepMetrics
	srv      *http.Server
	done     chan struct{}
}

// startMetrics listens on addr before anything is served, so a bad or busy
// address fails the start.
func startMetrics(ctx context.Context, addr string) (*metrics, error) {
	m := newMetrics()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics_address: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	m.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(m.done)
		if err := m.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).Error("metrics endpoint stopped")
		}
	}()
	log.G(ctx).Infof("serving metrics on http://%s/metrics", l.Addr())
	return m, nil
}

// newMetrics registers every collector except the snapshotter's, which
// watch and watchSnapshotter add once the snapshotter is open.
func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "grpc_calls_total",
			Help:      "Snapshots API calls handled, by method and gRPC status code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace,
			Name:      "grpc_call_duration_seconds",
			Help:      "Time to handle a snapshots API call, by method.",
			Buckets:   prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}, []string{"method"}),
		steps: newStepMetrics(),
		done:  make(chan struct{}),
	}
	m.reg.MustRegister(m.calls, m.duration, m.steps.duration, m.steps.errors,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// snapshotterCounters are counters the snapshotter keeps itself. Each is
// exported only when the snapshotter has its method; the tests' doubles
// may not.
var snapshotterCounters = []struct {
	name, help string
	get        func(sn any) (func() uint64, bool)
}{
	{"shared_layers_total", "Layer unpacks saved: containerd asked for a layer (by chain id) that a committed snapshot of any class or namespace held already.",
		func(sn any) (func() uint64, bool) {
			c, ok := sn.(interface{ SharedLayers() uint64 })
			if !ok {
				return nil, false
			}
			return c.SharedLayers, true
		}},
	{"pool_growths_total", "Times the embedded pool grew itself (max_data_size) since the daemon started.",
		func(sn any) (func() uint64, bool) {
			c, ok := sn.(interface{ Growths() uint64 })
			if !ok {
				return nil, false
			}
			return c.Growths, true
		}},
}

// watchSnapshotter exports snapshotterCounters.
func (m *metrics) watchSnapshotter(sn any) error {
	var errs []error
	for _, c := range snapshotterCounters {
		get, ok := c.get(sn)
		if !ok {
			continue
		}
		errs = append(errs, m.reg.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: c.name, Help: c.help,
		}, func() float64 { return float64(get()) })))
	}
	return errors.Join(errs...)
}

func (m *metrics) observe(method string, start time.Time, err error) {
	m.calls.WithLabelValues(method, status.Code(err).String()).Inc()
	m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

func (m *metrics) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	m.observe(info.FullMethod, start, err)
	return resp, err
}

func (m *metrics) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	m.observe(info.FullMethod, start, err)
	return err
}

func (m *metrics) shutdown(ctx context.Context) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(sctx); err != nil {
		log.G(ctx).WithError(err).Warn("stopping metrics endpoint")
	}
	<-m.done
}
