package dmsetup

import "testing"

func TestDeviceName(t *testing.T) {
	if got := DeviceName("tp", 7); got != "tp-snap-7" {
		t.Fatalf("DeviceName = %q", got)
	}
	for _, tc := range []struct {
		pool, name string
		id         uint32
		ok         bool
	}{
		{"tp", "tp-snap-7", 7, true},
		{"tp", "tp-snap-0", 0, true},
		{"tp", "tp-snap-16777215", MaxThinID, true},
		{"tp", "tp-snap-16777216", 0, false},
		{"tp", "tp-snap-07", 0, false},
		{"tp", "tp-snap-+7", 0, false},
		{"tp", "tp-snap-x", 0, false},
		{"tp", "tp-snap-", 0, false},
		{"tp", "tp-snap-7 ", 0, false},
		{"tp", "other-snap-7", 0, false},
		{"t", "tp-snap-7", 0, false},
		{"tp-snap-1", "tp-snap-1-snap-2", 2, true},
	} {
		id, ok := ParseDeviceName(tc.pool, tc.name)
		if id != tc.id || ok != tc.ok {
			t.Errorf("ParseDeviceName(%q, %q) = %d, %v; want %d, %v", tc.pool, tc.name, id, ok, tc.id, tc.ok)
		}
	}
}

func TestMajorMinor(t *testing.T) {
	if got := MajorMinor(253, 4294967295); got != "253:4294967295" {
		t.Fatalf("MajorMinor = %q", got)
	}
	for _, tc := range []struct {
		in           string
		major, minor uint32
		ok           bool
	}{
		{"253:0", 253, 0, true},
		{"7:12", 7, 12, true},
		{"4294967295:1", 4294967295, 1, true},
		{"4294967296:1", 0, 0, false},
		{"7:", 0, 0, false},
		{":7", 0, 0, false},
		{"7:1:2", 0, 0, false},
		{"-7:1", 0, 0, false},
		{"/dev/loop0", 0, 0, false},
		{"", 0, 0, false},
	} {
		major, minor, err := parseMajorMinor(tc.in)
		if major != tc.major || minor != tc.minor || (err == nil) != tc.ok {
			t.Errorf("parseMajorMinor(%q) = %d, %d, %v; want %d, %d, ok %v", tc.in, major, minor, err, tc.major, tc.minor, tc.ok)
		}
	}
}
