package dmsetup

import (
	"strings"
	"testing"
)

func TestParseLVMName(t *testing.T) {
	for _, tt := range []struct {
		in, vg, lv string
		bad        bool
	}{
		{in: "vg0/thinpool", vg: "vg0", lv: "thinpool"},
		{in: "my-vg/thin-pool_1.a+b", vg: "my-vg", lv: "thin-pool_1.a+b"},
		{in: "vg0", bad: true},
		{in: "/pool", bad: true},
		{in: "vg0/", bad: true},
		{in: "vg0/a/b", bad: true},
		{in: "-vg/pool", bad: true},
		{in: "vg/-pool", bad: true},
		{in: "../pool", bad: true},
		{in: "vg/..", bad: true},
		{in: "vg/po ol", bad: true},
		{in: "vg/pööl", bad: true},
		{in: "vg/" + strings.Repeat("p", 128), bad: true},
		// Each name is within LVM's limit but the dm name is not.
		{in: strings.Repeat("v", 60) + "/" + strings.Repeat("p", 62), bad: true},
		{in: strings.Repeat("v", 60) + "/" + strings.Repeat("p", 60), vg: strings.Repeat("v", 60), lv: strings.Repeat("p", 60)},
	} {
		vg, lv, err := ParseLVMName(tt.in)
		if tt.bad {
			if err == nil {
				t.Errorf("ParseLVMName(%q) = %q, %q; want an error", tt.in, vg, lv)
			}
			continue
		}
		if err != nil || vg != tt.vg || lv != tt.lv {
			t.Errorf("ParseLVMName(%q) = %q, %q, %v; want %q, %q", tt.in, vg, lv, err, tt.vg, tt.lv)
		}
	}
}

func TestLVMThinPoolNames(t *testing.T) {
	for _, tt := range []struct {
		vg, lv string
		want   []string
	}{
		{"vg0", "thinpool", []string{"vg0-thinpool-tpool", "vg0-thinpool"}},
		{"my-vg", "thin-pool", []string{"my--vg-thin--pool-tpool", "my--vg-thin--pool"}},
		{"a--b", "c", []string{"a----b-c-tpool", "a----b-c"}},
	} {
		got := LVMThinPoolNames(tt.vg, tt.lv)
		if strings.Join(got, " ") != strings.Join(tt.want, " ") {
			t.Errorf("LVMThinPoolNames(%q, %q) = %q, want %q", tt.vg, tt.lv, got, tt.want)
		}
		if LVMDeviceName(tt.vg, tt.lv) != tt.want[1] {
			t.Errorf("LVMDeviceName(%q, %q) = %q", tt.vg, tt.lv, LVMDeviceName(tt.vg, tt.lv))
		}
	}
}
