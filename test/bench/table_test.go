package main

import (
	"strings"
	"testing"
	"time"
)

func msd(v ...float64) []time.Duration {
	out := make([]time.Duration, len(v))
	for i, x := range v {
		out[i] = time.Duration(x * float64(time.Millisecond))
	}
	return out
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name     string
		in       []time.Duration
		med, p95 time.Duration
		n        int
	}{
		{"one", msd(7), 7 * time.Millisecond, 7 * time.Millisecond, 1},
		{"odd unsorted", msd(5, 1, 3), 3 * time.Millisecond, 5 * time.Millisecond, 3},
		{"even: mean of the middle two", msd(4, 1, 2, 3), 2500 * time.Microsecond, 4 * time.Millisecond, 4},
		// Nearest rank: ceil(0.95*20) = 19th of 1..20.
		{"twenty", msd(20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1),
			10500 * time.Microsecond, 19 * time.Millisecond, 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, ok := Summarize(tc.in)
			if !ok || st.N != tc.n || st.Median != tc.med || st.P95 != tc.p95 {
				t.Fatalf("Summarize = %+v, %v; want n %d median %v p95 %v", st, ok, tc.n, tc.med, tc.p95)
			}
		})
	}
	if _, ok := Summarize(nil); ok {
		t.Error("Summarize(nil) reported a result")
	}
}

func TestSummarizeKeepsInput(t *testing.T) {
	in := msd(3, 1, 2)
	Summarize(in)
	if in[0] != 3*time.Millisecond {
		t.Errorf("Summarize sorted its input: %v", in)
	}
}

func TestFormatTable(t *testing.T) {
	var s Samples
	for _, d := range msd(10, 20, 30) {
		s.Add("overlayfs", "Prepare", d)
	}
	for _, d := range msd(40, 50, 60) {
		s.Add("thin", "Prepare", d)
	}
	for _, d := range msd(1000, 2000, 3000) {
		s.Add("devmapper", "Prepare", d)
	}
	s.Add("thin", "Walk", 1500*time.Microsecond)
	got := FormatTable(&s, []string{"overlayfs", "thin", "devmapper"},
		[]Ratio{{"thin", "overlayfs"}, {"devmapper", "thin"}})
	lines := strings.Split(strings.TrimRight(got, "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("want header, rule and 2 rows, got:\n%s", got)
	}
	fields := func(l string) []string { return strings.Fields(l) }
	wantHeader := []string{"operation", "overlayfs", "med", "p95", "n", "thin", "med", "p95", "n", "devmapper", "med", "p95", "n",
		"thin/ovl", "med", "p95", "dm/thin", "med", "p95"}
	if h := fields(lines[0]); strings.Join(h, " ") != strings.Join(wantHeader, " ") {
		t.Errorf("header %q, want %q", h, wantHeader)
	}
	if strings.Trim(lines[1], "-") != "" || len(lines[1]) != len(lines[0]) {
		t.Errorf("rule %q does not span the header %q", lines[1], lines[0])
	}
	wantPrepare := []string{"Prepare", "20.0", "30.0", "3", "50.0", "60.0", "3", "2000", "3000", "3", "2.50", "2.00", "40.00", "50.00"}
	if f := fields(lines[2]); strings.Join(f, " ") != strings.Join(wantPrepare, " ") {
		t.Errorf("Prepare row %q, want %q", f, wantPrepare)
	}
	wantWalk := []string{"Walk", "-", "-", "-", "1.50", "1.50", "1", "-", "-", "-", "-", "-", "-", "-"}
	if f := fields(lines[3]); strings.Join(f, " ") != strings.Join(wantWalk, " ") {
		t.Errorf("Walk row %q, want %q", f, wantWalk)
	}
	// Columns line up: every row is as wide as the header.
	for _, l := range lines[2:] {
		if len(l) != len(lines[0]) {
			t.Errorf("row %q is %d wide, header %d", l, len(l), len(lines[0]))
		}
	}
}

func TestFormatTableOpOrder(t *testing.T) {
	var s Samples
	s.Add("thin", "Commit", time.Millisecond)
	s.Add("overlayfs", "Prepare", time.Millisecond)
	s.Add("overlayfs", "Commit", time.Millisecond)
	got := FormatTable(&s, []string{"overlayfs", "thin"}, nil)
	if i, j := strings.Index(got, "Commit"), strings.Index(got, "Prepare"); i < 0 || j < 0 || i > j {
		t.Errorf("operations not in first-measured order:\n%s", got)
	}
}
