package main

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// The self-check's lines of status, for each state it can be in.
func TestPrintSelfCheck(t *testing.T) {
	ended := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	many := make([]snapshotter.Finding, 12)
	for i := range many {
		many[i] = snapshotter.Finding{Kind: snapshotter.FindingOrphan, DeviceID: uint32(100 + i), Message: fmt.Sprintf("orphan %d", 100+i)}
	}
	tests := []struct {
		name     string
		interval time.Duration
		run      snapshotter.CheckRun
		want     []string
	}{
		{name: "off", want: []string{"self-check: off (check_interval = 0); none yet"}},
		{name: "none yet", interval: 90 * time.Minute, want: []string{"self-check: every 1h30m; none yet"}},
		{name: "consistent", interval: time.Hour, run: snapshotter.CheckRun{Trigger: snapshotter.CheckPeriodic, Ended: ended, Duration: 2 * time.Second},
			want: []string{"self-check: every 1h; last after interval, ended 2026-01-02T03:04:05Z, took 2s: consistent"}},
		{name: "could not check", interval: time.Hour, run: snapshotter.CheckRun{Trigger: snapshotter.CheckPeriodic, Ended: ended, Error: "thin_ls: not found"},
			want: []string{"self-check: every 1h; last after interval, ended 2026-01-02T03:04:05Z, took 0s: could not check: thin_ls: not found"}},
		{name: "after turning it off", run: snapshotter.CheckRun{Trigger: snapshotter.CheckAfterRecovery, Ended: ended, Findings: many[:1]},
			want: []string{
				"self-check: off (check_interval = 0); last after recovery, ended 2026-01-02T03:04:05Z, took 0s: 1 problem, 0 repaired online, 1 left",
				": left orphan: orphan 100",
			}},
		{name: "many findings", interval: time.Hour, run: snapshotter.CheckRun{Trigger: snapshotter.CheckPeriodic, Ended: ended, Findings: many},
			want: slices.Concat(
				[]string{"self-check: every 1h; last after interval, ended 2026-01-02T03:04:05Z, took 0s: 12 problems, 0 repaired online, 12 left"},
				func() (out []string) {
					for i := range 10 {
						out = append(out, fmt.Sprintf(": left orphan: orphan %d", 100+i))
					}
					return out
				}(),
				[]string{": ... 2 more: thin-snapshotter check --online lists them"},
			)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			row := func(name, format string, args ...any) {
				got = append(got, name+": "+fmt.Sprintf(format, args...))
			}
			printSelfCheck(row, selfCheckToProto(tc.interval, tc.run))
			if !slices.Equal(got, tc.want) {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// Before the first self-check, its findings are zeros and its last run is
// missing, not a run at time 0: an alert on its age would fire at once.
func TestCheckMetricsBeforeFirstRun(t *testing.T) {
	cd := newCheckDescs(func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	})
	series := map[*prometheus.Desc][]float64{}
	cd.collect(func(d *prometheus.Desc, v float64, _ ...string) { series[d] = append(series[d], v) }, time.Hour, snapshotter.CheckRun{})
	zeros := make([]float64, len(snapshotter.FindingKinds))
	if len(series) != 3 || !slices.Equal(series[cd.interval], []float64{3600}) ||
		!slices.Equal(series[cd.findings], zeros) || !slices.Equal(series[cd.repaired], zeros) {
		t.Errorf("series before the first run: %v", series)
	}
}

// The kinds the metrics export are the kinds check --help explains.
func TestFindingKindsExplained(t *testing.T) {
	var explained []string
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z_]+) +\S`).FindAllStringSubmatch(checkDescription, -1) {
		explained = append(explained, m[1])
	}
	var kinds []string
	for _, k := range snapshotter.FindingKinds {
		kinds = append(kinds, string(k))
	}
	if !slices.Equal(explained, kinds) {
		t.Errorf("check --help explains %q, snapshotter.FindingKinds are %q", explained, kinds)
	}
}
