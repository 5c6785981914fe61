package main

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

// contrib/prometheus/alerts.yml parses with Prometheus' own rule parser
// (strict: unknown fields fail), and every metric its expressions select is
// one the daemon exports.
func TestContribAlerts(t *testing.T) {
	p := parser.NewParser(parser.Options{})
	groups, errs := rulefmt.ParseFile(filepath.Join(contribDir, "prometheus", "alerts.yml"), false, model.UTF8Validation, p, slog.Default())
	for _, err := range errs {
		t.Error(err)
	}
	if len(errs) > 0 {
		t.FailNow()
	}

	exported := exportedMetricNames(t)
	alerts := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("group %s: a rule without alert name (recording rules belong elsewhere)", g.Name)
				continue
			}
			alerts[r.Alert] = true
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s: needs a severity label and summary and description annotations", r.Alert)
			}
			expr, err := p.ParseExpr(r.Expr)
			if err != nil {
				t.Errorf("alert %s: %v", r.Alert, err)
				continue
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok && !exported[vs.Name] {
					t.Errorf("alert %s selects %s, which the daemon does not export", r.Alert, vs.Name)
				}
				return nil
			})
		}
	}
	// What the issue asks to alert on.
	for _, want := range []string{
		"ThinSnapshotterPoolDataSpaceLow", "ThinSnapshotterPoolMetadataSpaceLow", "ThinSnapshotterPoolNeedsCheck",
		"ThinSnapshotterPoolFailed", "ThinSnapshotterPoolReadOnly", "ThinSnapshotterPendingRemovalsGrowing",
		"ThinSnapshotterJournalBacklog", "ThinSnapshotterCheckFindings",
	} {
		if !alerts[want] {
			t.Errorf("alerts.yml has no %s", want)
		}
	}
}

// exportedMetricNames gathers the daemon's registry, watching a snapshotter
// with the admin methods, and returns every series name it exposes.
func exportedMetricNames(t *testing.T) map[string]bool {
	t.Helper()
	m := newMetrics()
	if err := m.watch(newAdminSnapshotter(t)); err != nil {
		t.Fatal(err)
	}
	if err := m.watch(newAdminSnapshotter(t)); err == nil {
		t.Error("a second snapshotter's pool metrics were registered over the first's")
	}
	// A series with labels appears only once it is used, so make every
	// gRPC series exist.
	m.calls.WithLabelValues("m", "OK")
	m.duration.WithLabelValues("m")
	families, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range families {
		name := f.GetName()
		names[name] = true
		if strings.HasSuffix(f.GetType().String(), "HISTOGRAM") {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[name+s] = true
			}
		}
	}
	if !names["thin_snapshotter_pool_data_used_bytes"] || !names["thin_snapshotter_kernel_step_duration_seconds_bucket"] {
		t.Fatalf("registry lacks the pool metrics: %v", names)
	}
	return names
}
