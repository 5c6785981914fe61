package main

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// checkDescs are the metrics of the daemon's self-check (Status's
// CheckInterval and LastCheck).
type checkDescs struct {
	interval, findings, repaired, ended, duration, success *prometheus.Desc
}

func newCheckDescs(d func(name, help string, labels ...string) *prometheus.Desc) checkDescs {
	return checkDescs{
		interval: d("check_interval_seconds", "How often the daemon checks itself (check_interval); 0 when it does not."),
		findings: d("check_findings",
			"Findings of the last self-check that it did not repair online, by kind: they need a person, or thin-snapshotter check --repair with the daemon stopped.", "kind"),
		repaired: d("check_repaired", "Findings the last self-check repaired online, by kind.", "kind"),
		ended:    d("check_last_run_timestamp_seconds", "When the last self-check ended (Unix time); missing before the first."),
		duration: d("check_last_run_duration_seconds", "How long the last self-check took; missing before the first."),
		success: d("check_last_run_success",
			"1 when the last self-check could check, 0 when it could not (its error is in thin-snapshotter status); missing before the first."),
	}
}

func (cd checkDescs) descs() []*prometheus.Desc {
	return []*prometheus.Desc{cd.interval, cd.findings, cd.repaired, cd.ended, cd.duration, cd.success}
}

// collect exports every finding kind, zeros included, so that alerts see
// zeros rather than missing series.
func (cd checkDescs) collect(gauge func(*prometheus.Desc, float64, ...string), interval time.Duration, run snapshotter.CheckRun) {
	gauge(cd.interval, interval.Seconds())
	left, repaired := run.Counts()
	for _, k := range snapshotter.FindingKinds {
		gauge(cd.findings, float64(left[k]), string(k))
		gauge(cd.repaired, float64(repaired[k]), string(k))
	}
	if run.Ended.IsZero() {
		return
	}
	gauge(cd.ended, float64(run.Ended.UnixNano())/1e9)
	gauge(cd.duration, run.Duration.Seconds())
	gauge(cd.success, boolValue(run.Error == ""))
}
