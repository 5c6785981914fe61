package dmsetup

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func TestPoolTable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		length  Sectors
		p       PoolParams
		want    string
		wantErr bool
	}{
		{
			name:   "plain",
			length: 2097152,
			p:      PoolParams{MetadataDev: "7:0", DataDev: "7:1", BlockSizeSectors: 128},
			want:   "7:0 7:1 128 0 0",
		},
		{
			name:   "all features",
			length: 2097152,
			p: PoolParams{MetadataDev: "/dev/loop0", DataDev: "/dev/loop1", BlockSizeSectors: 2097152, LowWaterMark: 32768,
				SkipBlockZeroing: true, IgnoreDiscard: true, NoDiscardPassdown: true, ReadOnly: true, ErrorIfNoSpace: true},
			want: "/dev/loop0 /dev/loop1 2097152 32768 5 skip_block_zeroing ignore_discard no_discard_passdown read_only error_if_no_space",
		},
		{
			name:   "one feature",
			length: 1024,
			p:      PoolParams{MetadataDev: "7:0", DataDev: "7:1", BlockSizeSectors: 1024, SkipBlockZeroing: true},
			want:   "7:0 7:1 1024 0 1 skip_block_zeroing",
		},
		{name: "block size too small", length: 1 << 20, p: PoolParams{MetadataDev: "a", DataDev: "b", BlockSizeSectors: 64}, wantErr: true},
		{name: "block size not multiple", length: 1 << 20, p: PoolParams{MetadataDev: "a", DataDev: "b", BlockSizeSectors: 200}, wantErr: true},
		{name: "block size too big", length: 1 << 30, p: PoolParams{MetadataDev: "a", DataDev: "b", BlockSizeSectors: 2097152 + 128}, wantErr: true},
		{name: "block size zero", length: 1 << 20, p: PoolParams{MetadataDev: "a", DataDev: "b"}, wantErr: true},
		{name: "no metadata dev", length: 1 << 20, p: PoolParams{DataDev: "b", BlockSizeSectors: 128}, wantErr: true},
		{name: "space in data dev", length: 1 << 20, p: PoolParams{MetadataDev: "a", DataDev: "b c", BlockSizeSectors: 128}, wantErr: true},
		{name: "shorter than a block", length: 127, p: PoolParams{MetadataDev: "a", DataDev: "b", BlockSizeSectors: 128}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg, err := poolTable(tc.length, tc.p)
			if tc.wantErr {
				if !errors.Is(err, unix.EINVAL) {
					t.Fatalf("err %v, want EINVAL", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tg.Type != "thin-pool" || tg.Start != 0 || tg.Length != tc.length || tg.Params != tc.want {
				t.Fatalf("got %+v, want params %q", tg, tc.want)
			}
			back, err := ParsePoolParams(tg.Params)
			if err != nil {
				t.Fatal(err)
			}
			if back != tc.p {
				t.Errorf("round trip: got %+v want %+v", back, tc.p)
			}
		})
	}
}

func TestParsePoolParams(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want PoolParams
		ok   bool
	}{
		{"253:0 253:1 128 0", PoolParams{MetadataDev: "253:0", DataDev: "253:1", BlockSizeSectors: 128}, true},
		{"7:0 7:1 128 32768 1 skip_block_zeroing", PoolParams{MetadataDev: "7:0", DataDev: "7:1", BlockSizeSectors: 128, LowWaterMark: 32768, SkipBlockZeroing: true}, true},
		{"7:0 7:1 128 0 0", PoolParams{MetadataDev: "7:0", DataDev: "7:1", BlockSizeSectors: 128}, true},
		{"7:0 7:1 128", PoolParams{}, false},
		{"7:0 7:1 x 0", PoolParams{}, false},
		{"7:0 7:1 128 -1", PoolParams{}, false},
		{"7:0 7:1 128 0 2 skip_block_zeroing", PoolParams{}, false},
		{"7:0 7:1 128 0 1 frobnicate", PoolParams{}, false},
	} {
		got, err := ParsePoolParams(tc.in)
		if tc.ok != (err == nil) || got != tc.want {
			t.Errorf("%q: got %+v, %v", tc.in, got, err)
		}
		if err != nil && !errors.Is(err, ErrMalformed) {
			t.Errorf("%q: err %v not ErrMalformed", tc.in, err)
		}
	}
}

func TestThinTable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		length  Sectors
		pool    string
		id      uint32
		origin  string
		want    string
		wantErr bool
	}{
		{name: "plain", length: 20971520, pool: "/dev/mapper/pool", id: 7, want: "/dev/mapper/pool 7"},
		{name: "external origin", length: 8, pool: "253:0", id: maxThinID, origin: "253:5", want: "253:0 16777215 253:5"},
		{name: "id too big", length: 8, pool: "253:0", id: maxThinID + 1, wantErr: true},
		{name: "zero length", length: 0, pool: "253:0", id: 1, wantErr: true},
		{name: "no pool", length: 8, pool: "", id: 1, wantErr: true},
		{name: "bad origin", length: 8, pool: "253:0", id: 1, origin: "a b", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg, err := ThinTable(tc.length, tc.pool, tc.id, tc.origin)
			if tc.wantErr {
				if !errors.Is(err, unix.EINVAL) {
					t.Fatalf("err %v, want EINVAL", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tg.Type != "thin" || tg.Length != tc.length || tg.Params != tc.want {
				t.Fatalf("got %+v want %q", tg, tc.want)
			}
			back, err := parseThinParams(tg.Params)
			if err != nil {
				t.Fatal(err)
			}
			if want := (ThinParams{tc.pool, tc.id, tc.origin}); back != want {
				t.Errorf("round trip %+v want %+v", back, want)
			}
		})
	}
	for _, bad := range []string{"", "253:0", "253:0 x", "253:0 16777216", "a 1 b c"} {
		if _, err := parseThinParams(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseThinParams(%q): %v", bad, err)
		}
	}
}

func TestParsePoolStatus(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want PoolStatus
	}{
		{
			name: "kernel 4.19+ fresh pool",
			in:   "0 141/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024 ",
			want: PoolStatus{UsedMetaBlocks: 141, TotalMetaBlocks: 4096, TotalDataBlocks: 4096, Mode: "rw",
				DiscardMode: DiscardPassdown, NoSpacePolicy: QueueIfNoSpace, MetadataLowWatermark: 1024, HasMetadataLowWatermark: true},
		},
		{
			name: "kernel 4.19+ busy pool, held root, needs_check",
			in:   "18446744073709551615 4000/4096 81920/81920 4095 out_of_data_space no_discard_passdown error_if_no_space needs_check 1024",
			want: PoolStatus{TransactionID: 1<<64 - 1, UsedMetaBlocks: 4000, TotalMetaBlocks: 4096, UsedDataBlocks: 81920, TotalDataBlocks: 81920,
				HeldMetadataRoot: 4095, HasHeldRoot: true, Mode: PoolModeOutOfDataSpace, DiscardMode: NoDiscardPassdown,
				NoSpacePolicy: ErrorIfNoSpace, NeedsCheck: true, MetadataLowWatermark: 1024, HasMetadataLowWatermark: true},
		},
		{
			name: "read-only, discards ignored",
			in:   "3 100/4096 20/40960 - ro ignore_discard queue_if_no_space - 512",
			want: PoolStatus{TransactionID: 3, UsedMetaBlocks: 100, TotalMetaBlocks: 4096, UsedDataBlocks: 20, TotalDataBlocks: 40960,
				Mode: PoolModeRO, DiscardMode: IgnoreDiscard, NoSpacePolicy: QueueIfNoSpace, MetadataLowWatermark: 512, HasMetadataLowWatermark: true},
		},
		{
			name: "kernel 4.3-4.18 (no low watermark)",
			in:   "1 10/4161600 0/1638400 - rw discard_passdown queue_if_no_space -",
			want: PoolStatus{TransactionID: 1, UsedMetaBlocks: 10, TotalMetaBlocks: 4161600, TotalDataBlocks: 1638400,
				Mode: "rw", DiscardMode: DiscardPassdown, NoSpacePolicy: QueueIfNoSpace},
		},
		{
			name: "kernel 3.16-4.2 (no needs_check)",
			in:   "0 10/4096 0/81920 - rw discard_passdown queue_if_no_space",
			want: PoolStatus{UsedMetaBlocks: 10, TotalMetaBlocks: 4096, TotalDataBlocks: 81920, Mode: "rw",
				DiscardMode: DiscardPassdown, NoSpacePolicy: QueueIfNoSpace},
		},
		{
			name: "kernel 3.x (no no-space policy)",
			in:   "0 9/4096 0/40960 - rw discard_passdown",
			want: PoolStatus{UsedMetaBlocks: 9, TotalMetaBlocks: 4096, TotalDataBlocks: 40960, Mode: "rw", DiscardMode: DiscardPassdown},
		},
		{
			name: "kernel 3.2 (only counters)",
			in:   "0 9/4096 0/40960 -",
			want: PoolStatus{UsedMetaBlocks: 9, TotalMetaBlocks: 4096, TotalDataBlocks: 40960},
		},
		{
			name: "future trailing field ignored",
			in:   "2 11/4096 3/4096 - rw discard_passdown queue_if_no_space - 1024 some_new_flag 7",
			want: PoolStatus{TransactionID: 2, UsedMetaBlocks: 11, TotalMetaBlocks: 4096, UsedDataBlocks: 3, TotalDataBlocks: 4096,
				Mode: "rw", DiscardMode: DiscardPassdown, NoSpacePolicy: QueueIfNoSpace, MetadataLowWatermark: 1024, HasMetadataLowWatermark: true},
		},
		{name: "Fail", in: "Fail", want: PoolStatus{Fail: true}},
		{name: "Error", in: "Error", want: PoolStatus{Error: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePoolStatus(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
			again, err := parsePoolStatus(got.String())
			if err != nil || again != got {
				t.Errorf("String %q does not parse back: %+v %v", got.String(), again, err)
			}
		})
	}
}

func TestPoolStatusReadOnly(t *testing.T) {
	for _, tc := range []struct {
		st   PoolStatus
		want bool
	}{
		{PoolStatus{Mode: PoolModeRW}, false},
		{PoolStatus{Mode: PoolModeOutOfDataSpace}, false},
		{PoolStatus{Mode: PoolModeRO}, true},
		{PoolStatus{Mode: PoolModeRO, NeedsCheck: true}, true},
		{PoolStatus{Mode: PoolModeRW, NeedsCheck: true}, true},
		{PoolStatus{Fail: true}, true},
		{PoolStatus{Error: true}, true},
	} {
		if got := tc.st.ReadOnly(); got != tc.want {
			t.Errorf("%+v.ReadOnly() = %v, want %v", tc.st, got, tc.want)
		}
	}
}

func TestParsePoolStatusMalformed(t *testing.T) {
	for _, in := range []string{
		"",
		"Fail now",
		"OK",
		"x 1/2 3/4 -",
		"-1 1/2 3/4 -",
		"0 1/ 3/4 -",
		"0 12 3/4 -",
		"0 1/2 3/x -",
		"0 1/2 3/4 root",
		"0 1/2 3/4 - rx",
		"0 1/2 3/4 - rw passdown",
		"0 1/2 3/4 - rw discard_passdown maybe_if_no_space",
		"0 1/2 3/4 - rw discard_passdown queue_if_no_space check",
		"0 1/2 3/4 - rw discard_passdown queue_if_no_space - lots",
	} {
		if st, err := parsePoolStatus(in); !errors.Is(err, ErrMalformed) {
			t.Errorf("%q: got %+v, %v; want ErrMalformed", in, st, err)
		}
	}
}

func TestParseThinStatus(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ThinStatus
		ok   bool
	}{
		{"0 -", ThinStatus{}, true},
		{"2048 4095", ThinStatus{MappedSectors: 2048, HighestMapped: 4095, HasHighest: true}, true},
		{"18446744073709551615 0", ThinStatus{MappedSectors: 1<<64 - 1, HasHighest: true}, true},
		{"128 255 extra", ThinStatus{MappedSectors: 128, HighestMapped: 255, HasHighest: true}, true},
		{"Fail", ThinStatus{Fail: true}, true},
		{"", ThinStatus{}, false},
		{"-", ThinStatus{}, false},
		{"12", ThinStatus{}, false},
		{"x -", ThinStatus{}, false},
		{"12 y", ThinStatus{}, false},
	} {
		got, err := parseThinStatus(tc.in)
		if tc.ok != (err == nil) || got != tc.want {
			t.Errorf("%q: got %+v, %v", tc.in, got, err)
			continue
		}
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("%q: %v not ErrMalformed", tc.in, err)
			}
			continue
		}
		if again, err := parseThinStatus(got.String()); err != nil || again != got {
			t.Errorf("%q: String %q does not parse back", tc.in, got.String())
		}
	}
}

func TestValidateBlockSize(t *testing.T) {
	for _, tc := range []struct {
		s  uint32
		ok bool
	}{{0, false}, {64, false}, {128, true}, {192, false}, {256, true}, {2097152, true}, {2097280, false}} {
		if err := ValidateBlockSize(tc.s); (err == nil) != tc.ok {
			t.Errorf("%d: %v", tc.s, err)
		}
	}
}
