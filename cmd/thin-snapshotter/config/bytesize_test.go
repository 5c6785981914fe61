package config

import (
	"strings"
	"testing"
)

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		err  string // substring of the error; "" means success
	}{
		{in: "0", want: 0},
		{in: "1048576", want: 1 << 20},
		{in: "512B", want: 512},
		{in: "512b", want: 512},
		{in: "64KiB", want: 64 << 10},
		{in: "64kib", want: 64 << 10},
		{in: "64K", want: 64 << 10},
		{in: "64k", want: 64 << 10},
		{in: "64MiB", want: 64 << 20},
		{in: "64M", want: 64 << 20},
		{in: "10GiB", want: 10 << 30},
		{in: "10G", want: 10 << 30},
		{in: "2TiB", want: 2 << 40},
		{in: "2T", want: 2 << 40},
		{in: "1PiB", want: 1 << 50},
		{in: "500KB", want: 500_000},
		{in: "10MB", want: 10_000_000},
		{in: "1GB", want: 1_000_000_000},
		{in: "3TB", want: 3_000_000_000_000},
		{in: "1PB", want: 1_000_000_000_000_000},
		{in: " 10 GiB ", want: 10 << 30},
		{in: "007MiB", want: 7 << 20},
		{in: "18446744073709551615", want: 1<<64 - 1},

		{in: "", err: "empty"},
		{in: "   ", err: "empty"},
		{in: "GiB", err: "must start with a whole number"},
		{in: "-1GiB", err: "must start with a whole number"},
		{in: "+1GiB", err: "must start with a whole number"},
		{in: "1.5GiB", err: "fractions are not supported"},
		{in: "1,5G", err: "fractions are not supported"},
		{in: "10XB", err: `unknown unit "XB"`},
		{in: "10Gi", err: `unknown unit "Gi"`},
		{in: "10 G iB", err: "unknown unit"},
		{in: "0x10", err: "unknown unit"},
		{in: "1e9", err: "unknown unit"},
		{in: "18446744073709551616", err: "out of range"},
		{in: "16384PiB", err: "larger than"},
		{in: "20000000000GiB", err: "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseByteSize(tt.in)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseByteSize(%q) = %d, %v; want error containing %q", tt.in, got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseByteSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
			var u ByteSize
			if err := u.UnmarshalText([]byte(tt.in)); err != nil || u != tt.want {
				t.Fatalf("UnmarshalText(%q) = %d, %v; want %d", tt.in, u, err, tt.want)
			}
		})
	}
}

func TestByteSizeMarshalText(t *testing.T) {
	tests := []struct {
		in   ByteSize
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1000, "1000"},
		{1024, "1KiB"},
		{1536, "1536"},
		{64 * kib, "64KiB"},
		{1536 * mib, "1536MiB"},
		{100 * gib, "100GiB"},
		{3 * tib, "3TiB"},
		{2 * pib, "2PiB"},
		{1_000_000_000, "1000000000"},
		{1<<64 - 1, "18446744073709551615"},
	}
	for _, tt := range tests {
		b, err := tt.in.MarshalText()
		if err != nil || string(b) != tt.want {
			t.Errorf("MarshalText(%d) = %q, %v; want %q", uint64(tt.in), b, err, tt.want)
			continue
		}
		back, err := parseByteSize(string(b))
		if err != nil || back != tt.in {
			t.Errorf("parseByteSize(%q) = %d, %v; want %d", b, back, err, uint64(tt.in))
		}
	}
}
