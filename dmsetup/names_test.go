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
		{"tp", "tp-snap-16777215", maxThinID, true},
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

func TestDeviceUUID(t *testing.T) {
	long := string(make([]byte, 127))
	seen := map[string]bool{}
	for _, tc := range []struct {
		pool string
		id   uint32
	}{{"tp", 1}, {"tp", 2}, {"tq", 1}, {long, maxThinID}} {
		u := DeviceUUID(tc.pool, tc.id)
		if len(u) >= uuidLen || len(u) < len(UUIDPrefix) || u[:len(UUIDPrefix)] != UUIDPrefix {
			t.Errorf("DeviceUUID(%q, %d) = %q: want %q prefix, under %d bytes", tc.pool, tc.id, u, UUIDPrefix, uuidLen)
		}
		if seen[u] {
			t.Errorf("DeviceUUID(%q, %d) = %q twice", tc.pool, tc.id, u)
		}
		seen[u] = true
	}
	if got := DeviceUUID("tp", 7); len(got) != len("THIN-")+12+2 || got[len(got)-2:] != "-7" {
		t.Errorf("DeviceUUID(tp, 7) = %q, want THIN-<12 hex>-7", got)
	}
}

func TestUdevCookie(t *testing.T) {
	for _, tc := range []struct {
		f    UdevFlags
		want uint32
	}{
		{0, 0},
		{udevDisableDiskRules, 0x0004_0000},
		// What `dmsetup udevflags 0x4E0000` decodes as primary source,
		// disable subsystem, disk and other rules.
		{UdevPrivate, 0x004E_0000},
	} {
		if got := tc.f.cookie(); got != tc.want {
			t.Errorf("cookie(%#x) = %#x, want %#x", tc.f, got, tc.want)
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
