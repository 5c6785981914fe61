package main

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// metricsNamespace prefixes every metric the daemon exports.
const metricsNamespace = "thin_snapshotter"

// statusTimeout bounds the snapshotter's Status during a scrape.
const statusTimeout = 10 * time.Second

// poolCollector exports the snapshotter's Status, read anew at every scrape.
// A scrape therefore costs a pool status ioctl, a table ioctl, a database
// read transaction and a dm device list.
type poolCollector struct {
	sn adminBackend

	up, mode, needsCheck, whenFullQueue     *prometheus.Desc
	data, metadata                          spaceDescs
	snaps, notReady, devices                *prometheus.Desc
	journal, removals, warm                 *prometheus.Desc
	recoveryActions, recoveryDuration, info *prometheus.Desc
	check                                   checkDescs
}

// spaceDescs are the metrics of one of the pool's two spaces.
type spaceDescs struct {
	used, size, minFree, lowWater *prometheus.Desc
}

func newSpaceDescs(space string, d func(name, help string, labels ...string) *prometheus.Desc) spaceDescs {
	return spaceDescs{
		used: d("pool_"+space+"_used_bytes", "Used "+space+" space of the pool."),
		size: d("pool_"+space+"_size_bytes", "Size of the pool's "+space+" space."),
		minFree: d("pool_"+space+"_min_free_ratio",
			"Free fraction of the "+space+" space below which new snapshots are refused (min_free_"+space+"); 0 is off."),
		lowWater: d("pool_"+space+"_low_water_mark_crossed",
			"1 when the free "+space+" space is at or below its low-water mark (data: the pool table's; metadata: the kernel's)."),
	}
}

func (sd spaceDescs) descs() []*prometheus.Desc {
	return []*prometheus.Desc{sd.used, sd.size, sd.minFree, sd.lowWater}
}

func (sd spaceDescs) collect(gauge func(*prometheus.Desc, float64, ...string), used, size uint64, minFreePercent float64, lowWater bool) {
	gauge(sd.used, float64(used))
	gauge(sd.size, float64(size))
	gauge(sd.minFree, minFreePercent/100)
	gauge(sd.lowWater, boolValue(lowWater))
}

// poolModes are the values of thin_snapshotter_pool_mode's mode label:
// every one is exported, the current one with value 1.
var poolModes = []string{snapshotter.ModeRW, snapshotter.ModeRO, snapshotter.ModeOutOfDataSpace, snapshotter.ModeNeedsCheck, snapshotter.ModeFail}

func newPoolCollector(sn adminBackend) *poolCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, "", name), help, labels, nil)
	}
	return &poolCollector{
		sn:         sn,
		up:         d("pool_status_up", "1 when the last scrape read the pool's status, 0 when it failed (the other pool metrics are then missing)."),
		mode:       d("pool_mode", "The pool's mode: 1 for the current one (rw, ro, out_of_data_space, needs_check, fail), 0 for the others.", "mode"),
		needsCheck: d("pool_needs_check", "1 when the kernel flagged the pool's metadata for thin_check."),
		whenFullQueue: d("pool_queue_when_full",
			"1 when writes to the full pool wait for it to grow (queue_if_no_space), 0 when they fail at once (error_if_no_space)."),
		data:     newSpaceDescs("data", d),
		metadata: newSpaceDescs("metadata", d),
		snaps:    d("snapshots", "Ready snapshots by kind.", "kind"),
		notReady: d("snapshots_not_ready", "Snapshot records left creating or removing."),
		devices:  d("dm_devices", "Active dm devices of the pool's thin volumes."),
		journal:  d("journal_pending_entries", "Journal entries: operations in flight or interrupted."),
		removals: d("pending_removals", "Removals decided but not finished (a busy device, or async_remove)."),
		warm:     d("warm_devices", "Devices made ahead for a committed snapshot's next child (counted in dm_devices too)."),
		recoveryActions: d("recovery_actions",
			"What the recovery at this process's start did, by action.", "action"),
		recoveryDuration: d("recovery_duration_seconds", "How long the recovery at this process's start took."),
		info:             d("build_info", "The daemon's version and commit.", "version", "commit"),
		check:            newCheckDescs(d),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	descs := []*prometheus.Desc{c.up, c.mode, c.needsCheck, c.whenFullQueue, c.snaps, c.notReady, c.devices, c.journal, c.removals, c.warm,
		c.recoveryActions, c.recoveryDuration, c.info}
	descs = append(append(append(descs, c.data.descs()...), c.metadata.descs()...), c.check.descs()...)
	for _, d := range descs {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	v, commit := buildVersion()
	gauge(c.info, 1, v, commit)

	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	st, err := c.sn.Status(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Warn("metrics: reading the pool status")
		gauge(c.up, 0)
		return
	}
	gauge(c.up, 1)
	for _, m := range poolModes {
		gauge(c.mode, boolValue(st.Mode == m), m)
	}
	gauge(c.needsCheck, boolValue(st.NeedsCheck))
	gauge(c.whenFullQueue, boolValue(st.WhenFull == snapshotter.WhenFullQueue))
	c.data.collect(gauge, st.DataUsed, st.DataTotal, st.MinFreeData, st.DataLowWater)
	c.metadata.collect(gauge, st.MetadataUsed, st.MetadataTotal, st.MinFreeMetadata, st.MetadataLowWater)
	for _, k := range snapshotter.Kinds {
		gauge(c.snaps, float64(st.Snapshots[k]), k)
	}
	gauge(c.notReady, float64(st.NotReady))
	gauge(c.devices, float64(st.ActiveDevices))
	gauge(c.journal, float64(st.PendingJournal))
	gauge(c.removals, float64(st.PendingRemovals))
	gauge(c.warm, float64(st.WarmDevices))
	r := st.LastRecovery
	for action, n := range map[string]int{
		"rolled_back_create": r.RolledBackCreates,
		"finished_removal":   r.FinishedRemovals,
		"deferred_removal":   r.DeferredRemovals,
		"dropped_operation":  r.DroppedOperations,
		"reactivated_device": r.ReactivatedDevices,
		"finished_commit":    r.FinishedCommits,
	} {
		gauge(c.recoveryActions, float64(n), action)
	}
	gauge(c.recoveryDuration, r.Duration.Seconds())
	c.check.collect(gauge, st.CheckInterval, st.LastCheck)
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// stepMetrics records how long the snapshotter's kernel steps take and how
// many fail. The snapshotter reports each step to it, as its
// snapshotter.StepObserver.
type stepMetrics struct {
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
}

func newStepMetrics() *stepMetrics {
	m := &stepMetrics{
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace,
			Name:      "kernel_step_duration_seconds",
			Help:      "Time of the kernel steps of snapshot operations (create_snap, activate, deactivate, delete, mkfs), failed ones included.",
			// From 100µs to about 100s: from one ioctl to the mkfs of a
			// large base device.
			Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 16),
		}, []string{"step"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "kernel_step_errors_total",
			Help:      "Kernel steps of snapshot operations that failed.",
		}, []string{"step"}),
	}
	// Create every step's series at start, so that rates and alerts see
	// zeros instead of missing series.
	for _, s := range snapshotter.Steps {
		m.duration.WithLabelValues(string(s))
		m.errors.WithLabelValues(string(s))
	}
	return m
}

func (m *stepMetrics) ObserveStep(step snapshotter.Step, d time.Duration, err error) {
	m.duration.WithLabelValues(string(step)).Observe(d.Seconds())
	if err != nil {
		m.errors.WithLabelValues(string(step)).Inc()
	}
}

// watch exports the pool metrics and step latencies of sn when it has them
// (the snapshotter does; the tests' doubles may not). The metrics carry no
// pool label, so a registry holds one snapshotter's: registering a second
// one fails.
func (m *metrics) watch(sn any) error {
	a, ok := sn.(adminBackend)
	if !ok {
		return nil
	}
	if err := m.reg.Register(newPoolCollector(a)); err != nil {
		return fmt.Errorf("pool metrics: %w", err)
	}
	a.SetStepObserver(m.steps)
	return nil
}
