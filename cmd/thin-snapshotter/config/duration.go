package config

import (
	"fmt"
	"strings"
	"time"
)

// Duration is a time span that reads and writes Go's duration text in
// TOML: "1h", "30m", "90s", "1h30m"; "0" is zero. go-toml stores a bare
// integer as nanoseconds without asking UnmarshalText; the minimum the
// snapshotter validates refuses that.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return fmt.Errorf("invalid duration %q: write a number with a unit (e.g. \"1h\", \"30m\", \"90s\"), or \"0\"", text)
	}
	*d = Duration(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler, as String.
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(d.String()), nil
}

// String is Go's duration text without zero trailing units: "1h", not
// "1h0m0s".
func (d Duration) String() string {
	s := time.Duration(d).String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
