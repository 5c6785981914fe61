package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Samples holds the measured durations per snapshotter and per operation,
// with the operations in the order they were first measured.
type Samples struct {
	Ops  []string
	Data map[string]map[string][]time.Duration // snapshotter -> op -> samples
}

// Add records one duration.
func (s *Samples) Add(snapshotter, op string, d time.Duration) {
	if s.Data == nil {
		s.Data = map[string]map[string][]time.Duration{}
	}
	if !slices.Contains(s.Ops, op) {
		s.Ops = append(s.Ops, op)
	}
	m := s.Data[snapshotter]
	if m == nil {
		m = map[string][]time.Duration{}
		s.Data[snapshotter] = m
	}
	m[op] = append(m[op], d)
}

// Stat is the summary of one cell of the table.
type Stat struct {
	N           int
	Median, P95 time.Duration
}

// Summarize returns the median (mean of the two middle samples for an even
// count) and the nearest-rank 95th percentile. ok is false without samples.
func Summarize(ds []time.Duration) (Stat, bool) {
	if len(ds) == 0 {
		return Stat{}, false
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	rank := int(math.Ceil(0.95 * float64(n)))
	return Stat{N: n, Median: med, P95: s[rank-1]}, true
}

// Ratio is one column of ratios: Num/Den of the medians (and of the p95s).
type Ratio struct{ Num, Den string }

func ms(d time.Duration) string {
	v := float64(d) / float64(time.Millisecond)
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func ratio(a, b time.Duration) string {
	if b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", float64(a)/float64(b))
}

// FormatTable renders one row per operation: for each snapshotter (in the
// given order) median, p95 (ms) and the sample count, then for each ratio
// the quotient of the medians and of the p95s. Missing cells print "-".
func FormatTable(s *Samples, snapshotters []string, ratios []Ratio) string {
	header := []string{"operation"}
	for _, sn := range snapshotters {
		header = append(header, sn+" med", "p95", "n")
	}
	for _, r := range ratios {
		name := short(r.Num) + "/" + short(r.Den)
		header = append(header, name+" med", "p95")
	}
	rows := [][]string{header}
	for _, op := range s.Ops {
		row := []string{op}
		stats := map[string]Stat{}
		for _, sn := range snapshotters {
			st, ok := Summarize(s.Data[sn][op])
			if !ok {
				row = append(row, "-", "-", "-")
				continue
			}
			stats[sn] = st
			row = append(row, ms(st.Median), ms(st.P95), fmt.Sprint(st.N))
		}
		for _, r := range ratios {
			a, okA := stats[r.Num]
			b, okB := stats[r.Den]
			if !okA || !okB {
				row = append(row, "-", "-")
				continue
			}
			row = append(row, ratio(a.Median, b.Median), ratio(a.P95, b.P95))
		}
		rows = append(rows, row)
	}
	widths := make([]int, len(header))
	for _, r := range rows {
		for i, c := range r {
			widths[i] = max(widths[i], len(c))
		}
	}
	var b strings.Builder
	for i, r := range rows {
		for j, c := range r {
			switch j {
			case 0:
				fmt.Fprintf(&b, "%-*s", widths[j], c)
			default:
				fmt.Fprintf(&b, "  %*s", widths[j], c)
			}
		}
		b.WriteString("\n")
		if i == 0 {
			total := len(widths)*2 - 2
			for _, w := range widths {
				total += w
			}
			b.WriteString(strings.Repeat("-", total) + "\n")
		}
	}
	return b.String()
}

// short abbreviates a snapshotter name for a ratio column header.
func short(name string) string {
	switch name {
	case "overlayfs":
		return "ovl"
	case "devmapper":
		return "dm"
	case ovlProxy:
		return "ovlproxy"
	}
	return name
}
