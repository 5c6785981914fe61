package main

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Outcomes of a container whose pod asks for a disk size: the label values
// of thin_snapshotter_nri_containers_total.
const (
	nriGrown   = "grown"
	nriKept    = "kept"
	nriRefused = "refused"
	nriFailed  = "failed"
)

// nriMetrics are the NRI plugin's metrics; it keeps them whether or not
// the daemon serves /metrics.
type nriMetrics struct {
	containers  *prometheus.CounterVec
	growSeconds prometheus.Histogram
}

func newNRIMetrics() *nriMetrics {
	m := &nriMetrics{
		containers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "nri_containers_total",
			Help:      "Containers on thin whose pod asks for a disk size, by outcome: grown, kept (at least that size already: a size class, base_size), refused (bad annotation), failed.",
		}, []string{"result"}),
		growSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace,
			Name:      "nri_grow_duration_seconds",
			Help:      "Time from NRI's CreateContainer request to the container's root filesystem grown to its pod's disk size.",
			Buckets:   prometheus.ExponentialBuckets(0.05, 2, 10),
		}),
	}
	for _, r := range []string{nriGrown, nriKept, nriRefused, nriFailed} {
		m.containers.WithLabelValues(r)
	}
	return m
}

func (m *nriMetrics) result(r string) { m.containers.WithLabelValues(r).Inc() }

// watchNRI exports p's metrics and whether it is registered with NRI.
func (m *metrics) watchNRI(p *nriPlugin) error {
	return errors.Join(
		m.reg.Register(p.metrics.containers),
		m.reg.Register(p.metrics.growSeconds),
		m.reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: metricsNamespace,
			Name:      "nri_connected",
			Help:      "1 while the daemon is registered with containerd's NRI and applies pod disk sizes.",
		}, func() float64 { return boolValue(p.connected.Load()) })),
	)
}
