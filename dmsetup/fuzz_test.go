package dmsetup

import (
	"errors"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func FuzzParsePoolStatus(f *testing.F) {
	for _, s := range []string{
		"0 141/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024",
		"5 4000/4096 81920/81920 4095 out_of_data_space no_discard_passdown error_if_no_space needs_check 1024",
		"1 10/4161600 0/1638400 - ro ignore_discard queue_if_no_space -",
		"0 9/4096 0/40960 -", "Fail", "Error", "", "0 1/2 3/4 - rw x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := parsePoolStatus(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: error %v is not ErrMalformed", s, err)
			}
			return
		}
		again, err := parsePoolStatus(st.String())
		if err != nil || again != st {
			t.Fatalf("%q parsed as %+v, its String %q parses as %+v, %v", s, st, st.String(), again, err)
		}
	})
}

func FuzzParseThinStatus(f *testing.F) {
	for _, s := range []string{"0 -", "2048 4095", "Fail", "", "-", "1 2 3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := parseThinStatus(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: error %v is not ErrMalformed", s, err)
			}
			return
		}
		again, err := parseThinStatus(st.String())
		if err != nil || again != st {
			t.Fatalf("%q parsed as %+v, its String %q parses as %+v, %v", s, st, st.String(), again, err)
		}
	})
}

func FuzzParsePoolParams(f *testing.F) {
	for _, s := range []string{"7:0 7:1 128 0 0", "7:0 7:1 128 32768 1 skip_block_zeroing", "253:0 253:1 1024 0", "a b c d e"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePoolParams(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: error %v is not ErrMalformed", s, err)
			}
			return
		}
		tg, err := poolTable(Sectors(p.BlockSizeSectors)+1, p)
		if err != nil {
			return // parsed but not something we would build, e.g. a bad block size
		}
		again, err := ParsePoolParams(tg.Params)
		if err != nil || again != p {
			t.Fatalf("%q parsed as %+v, rebuilt %q parses as %+v, %v", s, p, tg.Params, again, err)
		}
	})
}

func FuzzParseThinParams(f *testing.F) {
	for _, s := range []string{"253:0 7", "/dev/mapper/pool 16777215 253:5", "x", "a 1 b c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseThinParams(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: error %v is not ErrMalformed", s, err)
			}
			return
		}
		tg, err := ThinTable(8, p.PoolDev, p.ID, p.ExternalOrigin)
		if err != nil {
			t.Fatalf("%q parsed as %+v but does not build: %v", s, p, err)
		}
		again, err := parseThinParams(tg.Params)
		if err != nil || again != p {
			t.Fatalf("%q parsed as %+v, rebuilt %q parses as %+v, %v", s, p, tg.Params, again, err)
		}
	})
}

// FuzzDecodeReplies feeds arbitrary kernel reply data to every decoder.
func FuzzDecodeReplies(f *testing.F) {
	f.Add(statusReply([]Target{{0, 8, "linear", "7:0 0"}, {8, 8, "thin", "253:0 1"}}), uint32(2))
	f.Add(nameListReply([]nameRec{{kernelDev(253, 0), "pool", 1, "u", true}, {kernelDev(253, 1), "t", 2, "", false}}, 2), uint32(0))
	f.Add(targetVersionsReply([]targetVersion{{"thin", Version{1, 2, 3}}, {"linear", Version{1, 4, 0}}}), uint32(1))
	f.Add([]byte{}, uint32(1))
	f.Fuzz(func(t *testing.T, data []byte, count uint32) {
		if ts, err := decodeTargets(data, count); err == nil {
			if len(ts) != int(count) {
				t.Fatalf("decoded %d targets, count %d", len(ts), count)
			}
			// Well-formed targets re-encode to a reply that decodes the same.
			ok := true
			for _, tg := range ts {
				ok = ok && tg.validate() == nil
			}
			if ok {
				back, err := decodeTargets(statusReply(ts), count)
				if err != nil || !reflect.DeepEqual(back, ts) {
					t.Fatalf("re-encoded targets decode as %+v, %v; want %+v", back, err, ts)
				}
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatalf("decodeTargets: %v", err)
		}
		if _, err := decodeNameList(data); err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("decodeNameList: %v", err)
		}
		if _, err := decodeTargetVersions(data); err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("decodeTargetVersions: %v", err)
		}
	})
}

// fuzzIDList checks a parser of thin id listings: malformed input is
// ErrMalformed, and what parses is ascending and within the thin id range.
func fuzzIDList(t *testing.T, parse func([]byte) ([]uint32, error), in []byte) {
	ids, err := parse(in)
	if err != nil {
		if !errors.Is(err, ErrMalformed) {
			t.Fatalf("%q: error %v is not ErrMalformed", in, err)
		}
		return
	}
	for i, id := range ids {
		if id > maxThinID || (i > 0 && ids[i-1] > id) {
			t.Fatalf("%q parsed as %v: not ascending thin ids", in, ids)
		}
	}
}

func FuzzParseThinLs(f *testing.F) {
	for _, s := range []string{"7 \n1 \n2 \n", "", "1\nerror: x\n", "1 2\n", "16777215\n", "-1\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzIDList(t, parseThinLs, in)
		// What parses lists back as one id a line.
		if ids, err := parseThinLs(in); err == nil {
			var out []byte
			for _, id := range ids {
				out = strconv.AppendUint(out, uint64(id), 10)
				out = append(out, '\n')
			}
			if again, err := parseThinLs(out); err != nil || !slices.Equal(again, ids) {
				t.Fatalf("%q parsed as %v, relisted %q parses as %v, %v", in, ids, out, again, err)
			}
		}
	})
}

func FuzzParseThinDump(f *testing.F) {
	for _, s := range []string{
		`<superblock uuid="" time="1" transaction="3"><device dev_id="7" mapped_blocks="0"></device><device dev_id="1"><range_mapping origin_begin="0" data_begin="0" length="2" time="0"/></device></superblock>`,
		`<superblock></superblock>`, "no current metadata snap\n", `<superblock><device dev_id="x"></device></superblock>`,
		`<superblock><device dev_id="1">`, `<device dev_id="1"/>`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzIDList(t, parseThinDump, in)
	})
}

func FuzzUeventDevName(f *testing.F) {
	for _, s := range []string{"MAJOR=7\nDEVNAME=loop3\n", "DEVNAME=../x\n", "DEVNAME=/x", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		name, ok := ueventDevName(in)
		if !ok {
			return
		}
		if p := filepath.Join("/dev", name); !strings.HasPrefix(p, "/dev/") || p != "/dev/"+name {
			t.Fatalf("%q: DEVNAME %q escapes /dev", in, name)
		}
	})
}

func FuzzParseDeviceName(f *testing.F) {
	for _, s := range [][2]string{{"tp", "tp-snap-7"}, {"tp", "tp-snap-07"}, {"tp", "tp-snap-16777216"}, {"tp-snap-1", "tp-snap-1-snap-2"}, {"", "-snap-0"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pool, name string) {
		id, ok := ParseDeviceName(pool, name)
		if ok != (id <= maxThinID && DeviceName(pool, id) == name) {
			t.Fatalf("ParseDeviceName(%q, %q) = %d, %v; DeviceName gives %q", pool, name, id, ok, DeviceName(pool, id))
		}
	})
}

func FuzzParseMajorMinor(f *testing.F) {
	for _, s := range []string{"253:0", "7:12", "0:0", "4294967295:4294967295", "4294967296:0", "7:", ":7", "7:1:2", "+7:1", "007:1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		major, minor, err := parseMajorMinor(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: %v is not ErrMalformed", s, err)
			}
			return
		}
		// Parsing what MajorMinor writes gives the same device back.
		if a, b, err := parseMajorMinor(MajorMinor(major, minor)); err != nil || a != major || b != minor {
			t.Fatalf("%q -> %d:%d -> %q -> %d:%d, %v", s, major, minor, MajorMinor(major, minor), a, b, err)
		}
	})
}
