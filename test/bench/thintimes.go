package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Where thin's time goes. The daemon's own Prometheus histograms are read
// before and after each workload on thin: the difference is the time the
// daemon spent handling each snapshots call (server side, from the call's
// arrival to its reply) and each kernel step in them. The rest of a call's
// time in the table is containerd's and the gRPC hop's.
const (
	callsMetric = "thin_snapshotter_grpc_call_duration_seconds"
	stepsMetric = "thin_snapshotter_kernel_step_duration_seconds"
)

// spent is a histogram's count and sum.
type spent struct {
	n   uint64
	sum float64 // seconds
}

// thinTimes is spent per call ("Prepare") and per kernel step ("step
// activate").
type thinTimes map[string]spent

// freeLocalAddr is a loopback host:port nothing listens on now.
func freeLocalAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// scrapeThin reads thin's histograms from its metrics endpoint.
func scrapeThin(ctx context.Context, addr string) (thinTimes, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("thin metrics at %s: %s", addr, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("thin metrics at %s: %w", addr, err)
	}
	out := thinTimes{}
	for name, prefix := range map[string]string{callsMetric: "", stepsMetric: "step "} {
		fam, ok := fams[name]
		// Calls appear once one was made; every step from the start.
		if !ok && name == callsMetric {
			continue
		}
		if !ok {
			return nil, fmt.Errorf("thin metrics at %s: no %s", addr, name)
		}
		for _, m := range fam.GetMetric() {
			h := m.GetHistogram()
			if h == nil || len(m.GetLabel()) != 1 {
				return nil, fmt.Errorf("thin metrics at %s: %s is not a histogram with one label", addr, name)
			}
			// Calls are labelled with gRPC's full method name.
			key := prefix + path.Base(m.GetLabel()[0].GetValue())
			out[key] = spent{h.GetSampleCount(), h.GetSampleSum()}
		}
	}
	return out, nil
}

// since is what t adds to prev, one "name mean ms ×n" per call and step
// that happened, calls first, each group by name.
func (t thinTimes) since(prev thinTimes) string {
	var calls, steps []string
	for k, v := range t {
		d := spent{v.n - prev[k].n, v.sum - prev[k].sum}
		if d.n == 0 {
			continue
		}
		s := fmt.Sprintf("%s %.2f ×%d", strings.TrimPrefix(k, "step "), 1e3*d.sum/float64(d.n), d.n)
		if strings.HasPrefix(k, "step ") {
			steps = append(steps, s)
		} else {
			calls = append(calls, s)
		}
	}
	slices.Sort(calls)
	slices.Sort(steps)
	return fmt.Sprintf("handled in (mean ms × calls): %s; kernel steps: %s",
		orNone(strings.Join(calls, ", ")), orNone(strings.Join(steps, ", ")))
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
