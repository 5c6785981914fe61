package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// exposition is a metrics page with the daemon's two histograms.
func exposition(prepares, activates int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# TYPE %s histogram\n", callsMetric)
	for _, m := range []struct {
		method string
		n      int
		sum    float64
	}{
		{"/containerd.services.snapshots.v1.Snapshots/Prepare", prepares, 0.030 * float64(prepares)},
		{"/containerd.services.snapshots.v1.Snapshots/Stat", 4, 0.0002},
	} {
		fmt.Fprintf(&b, "%s_bucket{method=%q,le=\"+Inf\"} %d\n", callsMetric, m.method, m.n)
		fmt.Fprintf(&b, "%s_sum{method=%q} %g\n%s_count{method=%q} %d\n", callsMetric, m.method, m.sum, callsMetric, m.method, m.n)
	}
	fmt.Fprintf(&b, "# TYPE %s histogram\n", stepsMetric)
	for _, st := range []struct {
		step string
		n    int
	}{{"activate", activates}, {"delete", 0}} {
		fmt.Fprintf(&b, "%s_bucket{step=%q,le=\"+Inf\"} %d\n", stepsMetric, st.step, st.n)
		fmt.Fprintf(&b, "%s_sum{step=%q} %g\n%s_count{step=%q} %d\n", stepsMetric, st.step, 0.021*float64(st.n), stepsMetric, st.step, st.n)
	}
	return b.String()
}

func TestScrapeThin(t *testing.T) {
	var page atomic.Value
	page.Store(exposition(2, 1))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, page.Load()) }))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	ctx := context.Background()
	before, err := scrapeThin(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	page.Store(exposition(6, 3))
	after, err := scrapeThin(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	// Stat and delete did not move: left out.
	want := "handled in (mean ms × calls): Prepare 30.00 ×4; kernel steps: activate 21.00 ×2"
	if got := after.since(before); got != want {
		t.Errorf("since:\n got %s\nwant %s", got, want)
	}
	if got := before.since(before); got != "handled in (mean ms × calls): none; kernel steps: none" {
		t.Errorf("since itself: %s", got)
	}

	// Before the first call: steps only.
	page.Store(exposition(0, 0)[strings.Index(exposition(0, 0), "# TYPE "+stepsMetric):])
	if got, err := scrapeThin(ctx, addr); err != nil || len(got) != 2 {
		t.Errorf("a page without calls: %v, %v", got, err)
	}
	page.Store("# TYPE other counter\nother 1\n")
	if _, err := scrapeThin(ctx, addr); err == nil || !strings.Contains(err.Error(), "no "+stepsMetric) {
		t.Errorf("a page without the daemon's histograms: %v", err)
	}
}
