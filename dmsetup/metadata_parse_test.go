package dmsetup

import (
	"errors"
	"slices"
	"testing"
)

func TestParseMetadataTools(t *testing.T) {
	tests := []struct {
		name    string
		parse   func([]byte) ([]uint32, error)
		in      string
		want    []uint32
		wantErr bool
	}{
		{"ls", parseThinLs, "7 \n1 \n2 \n", []uint32{1, 2, 7}, false},
		{"ls empty", parseThinLs, "", nil, false},
		{"ls junk", parseThinLs, "1\nerror: x\n", nil, true},
		{"ls two columns", parseThinLs, "1 2\n", nil, true},
		{"ls id too big", parseThinLs, "16777216\n", nil, true},
		{"dump", parseThinDump, `<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="7" mapped_blocks="0" transaction="0" creation_time="1" snap_time="1">
  </device>
  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
  </device>
</superblock>
`, []uint32{1, 7}, false},
		{"dump empty pool", parseThinDump, `<superblock uuid="" time="0" transaction="0"></superblock>`, nil, false},
		{"dump no superblock", parseThinDump, "no current metadata snap\n", nil, true},
		{"dump bad id", parseThinDump, `<superblock><device dev_id="x"></device></superblock>`, nil, true},
		{"dump no id", parseThinDump, `<superblock><device></device></superblock>`, nil, true},
		{"dump truncated", parseThinDump, `<superblock><device dev_id="1">`, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.parse([]byte(tc.in))
			if (err != nil) != tc.wantErr || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v, error %v", got, err, tc.want, tc.wantErr)
			}
			if err != nil && !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
		})
	}
}

func TestUeventDevName(t *testing.T) {
	for in, want := range map[string]string{
		"MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n": "loop3",
		"DEVNAME=mapper/x\n":                              "mapper/x",
		"MAJOR=7\n":                                       "",
		"DEVNAME=\n":                                      "",
		"DEVNAME=../etc/x\n":                              "",
		"DEVNAME=/etc/x\n":                                "",
		"DEVNAME=./\n":                                    "",
	} {
		got, ok := ueventDevName([]byte(in))
		if got != want || ok != (want != "") {
			t.Errorf("%q: %q, %v; want %q", in, got, ok, want)
		}
	}
}
