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
