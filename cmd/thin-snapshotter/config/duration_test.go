package config

import (
	"testing"
	"time"
)

func TestDuration(t *testing.T) {
	for _, tc := range []struct {
		text string
		want time.Duration
		out  string // MarshalText; "" when text is invalid
	}{
		{"1h", time.Hour, "1h"},
		{"1h0m0s", time.Hour, "1h"},
		{"90m", 90 * time.Minute, "1h30m"},
		{"30m", 30 * time.Minute, "30m"},
		{"1m30s", 90 * time.Second, "1m30s"},
		{"2h0m5s", 2*time.Hour + 5*time.Second, "2h0m5s"},
		{"45s", 45 * time.Second, "45s"},
		{"0", 0, "0s"},
		{"-1h", -time.Hour, "-1h"},
		{"3600", 0, ""},
		{"1 hour", 0, ""},
		{"", 0, ""},
	} {
		var d Duration
		err := d.UnmarshalText([]byte(tc.text))
		if tc.out == "" {
			if err == nil {
				t.Errorf("%q parsed to %v", tc.text, time.Duration(d))
			}
			continue
		}
		if err != nil || time.Duration(d) != tc.want {
			t.Errorf("%q: %v, %v; want %v", tc.text, time.Duration(d), err, tc.want)
			continue
		}
		out, err := d.MarshalText()
		if err != nil || string(out) != tc.out {
			t.Errorf("%v marshals to %q, %v; want %q", tc.want, out, err, tc.out)
		}
		var back Duration
		if err := back.UnmarshalText(out); err != nil || back != d {
			t.Errorf("%q parses back to %v, %v", out, time.Duration(back), err)
		}
	}
}
