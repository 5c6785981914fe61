//go:build linux

package dmsetup

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestHeaderLayoutMatchesKernelStruct(t *testing.T) {
	var h unix.DmIoctl
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"data_size", offDataSize, unsafe.Offsetof(h.Data_size)},
		{"data_start", offDataStart, unsafe.Offsetof(h.Data_start)},
		{"target_count", offTargetCount, unsafe.Offsetof(h.Target_count)},
		{"open_count", offOpenCount, unsafe.Offsetof(h.Open_count)},
		{"flags", offFlags, unsafe.Offsetof(h.Flags)},
		{"event_nr", offEventNr, unsafe.Offsetof(h.Event_nr)},
		{"dev", offDev, unsafe.Offsetof(h.Dev)},
		{"name", offName, unsafe.Offsetof(h.Name)},
		{"uuid", offUUID, unsafe.Offsetof(h.Uuid)},
		{"sizeof", headerSize, unsafe.Sizeof(h)},
	} {
		if c.got != c.want {
			t.Errorf("%s: offset %d, kernel struct has %d", c.name, c.got, c.want)
		}
	}
	if headerSize%8 != 0 {
		t.Errorf("header size %d not 8-byte aligned", headerSize)
	}
	var s unix.DmTargetSpec
	if unsafe.Offsetof(s.Next) != 20 || unsafe.Offsetof(s.Target_type) != 24 || unsafe.Sizeof(s) != specSize {
		t.Errorf("dm_target_spec layout changed: next@%d type@%d size %d", unsafe.Offsetof(s.Next), unsafe.Offsetof(s.Target_type), unsafe.Sizeof(s))
	}
}

func TestNewRequest(t *testing.T) {
	req, err := newRequest("pool", unix.DM_READONLY_FLAG, 100)
	if err != nil {
		t.Fatal(err)
	}
	if uintptr(unsafe.Pointer(&req.buf[0]))%8 != 0 {
		t.Error("buffer not 8-byte aligned")
	}
	b := req.buf
	if got := [3]uint32{ne.Uint32(b[0:]), ne.Uint32(b[4:]), ne.Uint32(b[8:])}; got != requestVersion {
		t.Errorf("version %v", got)
	}
	if ds := ne.Uint32(b[offDataSize:]); int(ds) != len(b) || ds < headerSize+100 {
		t.Errorf("data_size %d, buffer %d", ds, len(b))
	}
	if ne.Uint32(b[offDataStart:]) != headerSize {
		t.Errorf("data_start %d", ne.Uint32(b[offDataStart:]))
	}
	if req.flags() != unix.DM_READONLY_FLAG {
		t.Errorf("flags %#x", req.flags())
	}
	if got := cString(b[offName:]); got != "pool" {
		t.Errorf("name %q", got)
	}
	if err := req.setUUID("LVM-abc"); err != nil {
		t.Fatal(err)
	}
	if got := (reply{buf: b}).uuid(); got != "LVM-abc" {
		t.Errorf("uuid %q", got)
	}

	for _, tc := range []struct {
		name, uuid string
	}{
		{strings.Repeat("n", nameLen), ""},
		{strings.Repeat("n", nameLen-1), strings.Repeat("u", uuidLen)},
	} {
		req, err := newRequest(tc.name, 0, 0)
		if err == nil {
			err = req.setUUID(tc.uuid)
		}
		if !errors.Is(err, unix.EINVAL) {
			t.Errorf("name %d bytes uuid %d bytes: err %v, want EINVAL", len(tc.name), len(tc.uuid), err)
		}
	}
}

func TestReplyInfo(t *testing.T) {
	req, _ := newRequest("thin-1", 0, 0)
	b := req.buf
	ne.PutUint32(b[offTargetCount:], 1)
	ne.PutUint32(b[offOpenCount:], 3)
	ne.PutUint32(b[offFlags:], unix.DM_SUSPEND_FLAG|unix.DM_ACTIVE_PRESENT_FLAG|unix.DM_DEFERRED_REMOVE)
	ne.PutUint32(b[offEventNr:], 42)
	ne.PutUint64(b[offDev:], unix.Mkdev(253, 300))
	_ = req.setUUID("uuid-1")
	got := reply{buf: b}.info()
	want := Info{
		Name: "thin-1", UUID: "uuid-1", Major: 253, Minor: 300, OpenCount: 3, EventNr: 42,
		TargetCount: 1, Suspended: true, LiveTable: true, DeferredRemove: true,
	}
	if got != want {
		t.Errorf("info\n got %+v\nwant %+v", got, want)
	}
}

// kernelDev encodes major:minor like the kernel's huge_encode_dev.
func kernelDev(major, minor uint32) uint64 {
	return uint64(minor&0xff | major<<8 | (minor&^0xff)<<12)
}

func TestKernelDevDecoding(t *testing.T) {
	for _, c := range [][2]uint32{{253, 0}, {253, 255}, {253, 256}, {7, 1048575}, {4095, 70000}} {
		d := kernelDev(c[0], c[1])
		if unix.Major(d) != c[0] || unix.Minor(d) != c[1] {
			t.Errorf("%d:%d decoded as %d:%d", c[0], c[1], unix.Major(d), unix.Minor(d))
		}
	}
}

func TestEncodeTargets(t *testing.T) {
	targets := []Target{
		{Start: 0, Length: 2048, Type: "linear", Params: "7:0 0"},
		{Start: 2048, Length: 4096, Type: "thin-pool", Params: "7:1 7:2 128 0 1 skip_block_zeroing"},
		{Start: 6144, Length: 1, Type: "error", Params: ""},
	}
	b, err := encodeTargets(targets)
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%8 != 0 {
		t.Errorf("encoded size %d not aligned", len(b))
	}
	// Walk it the way the kernel's populate_table does: next is relative to
	// the current spec and must keep specs 8-byte aligned.
	off := 0
	for i, want := range targets {
		rec := b[off:]
		next := int(ne.Uint32(rec[20:]))
		if next%8 != 0 || next < specSize+len(want.Params)+1 {
			t.Fatalf("target %d: next %d", i, next)
		}
		got := Target{
			Start: Sectors(ne.Uint64(rec[0:])), Length: Sectors(ne.Uint64(rec[8:])),
			Type: cString(rec[24:40]), Params: cString(rec[specSize:next]),
		}
		if got != want {
			t.Errorf("target %d: got %+v want %+v", i, got, want)
		}
		off += next
	}
	if off != len(b) {
		t.Errorf("walked %d of %d bytes", off, len(b))
	}
}

func TestEncodeTargetsRejects(t *testing.T) {
	for _, tc := range []Target{
		{Length: 1, Type: ""},
		{Length: 1, Type: "a-very-long-target-name"},
		{Length: 1, Type: "li near"},
		{Length: 0, Type: "linear", Params: "7:0 0"},
		{Length: 1, Type: "linear", Params: "7:0\x00 0"},
	} {
		if _, err := encodeTargets([]Target{tc}); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%+v: err %v, want EINVAL", tc, err)
		}
	}
}

// statusReply builds a TABLE_STATUS data area like the kernel's
// retrieve_status: next is relative to the start of the data area.
func statusReply(targets []Target) []byte {
	var b []byte
	for _, tg := range targets {
		start := len(b)
		rec := make([]byte, align8(specSize+len(tg.Params)+1))
		ne.PutUint64(rec[0:], uint64(tg.Start))
		ne.PutUint64(rec[8:], uint64(tg.Length))
		copy(rec[24:], tg.Type)
		copy(rec[specSize:], tg.Params)
		ne.PutUint32(rec[20:], uint32(start+len(rec)))
		b = append(b, rec...)
	}
	return b
}

func TestDecodeTargets(t *testing.T) {
	for _, tc := range []struct {
		name    string
		targets []Target
	}{
		{"none", []Target{}},
		{"one", []Target{{0, 2097152, "thin", "253:2 7"}}},
		{"three", []Target{
			{0, 8, "linear", "7:0 0"},
			{8, 16, "thin-pool", "0 10/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024"},
			{24, 100, "error", ""},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decodeTargets(statusReply(tc.targets), uint32(len(tc.targets)))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.targets) {
				t.Errorf("got %+v want %+v", got, tc.targets)
			}
		})
	}
}

func TestDecodeTargetsMalformed(t *testing.T) {
	good := statusReply([]Target{{0, 8, "linear", "7:0 0"}, {8, 8, "linear", "7:0 8"}})
	unterminated := append([]byte(nil), good[:specSize+5]...)
	backwards := append([]byte(nil), good...)
	ne.PutUint32(backwards[20:], 0)
	for name, tc := range map[string]struct {
		data  []byte
		count uint32
	}{
		"short":        {good[:10], 1},
		"count beyond": {good, 3},
		"unterminated": {unterminated, 1},
		"backwards":    {backwards, 2},
	} {
		if _, err := decodeTargets(tc.data, tc.count); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", name, err)
		}
	}
}

type nameRec struct {
	dev     uint64
	name    string
	eventNr uint32
	uuid    string
	hasUUID bool
}

// nameListReply builds LIST_DEVICES data in one of the kernel's formats:
// 0 = before 4.14 (name only), 1 = event_nr (4.14-5.12), 2 = event_nr,
// flags and uuid (5.13+, DM_UUID_FLAG requested).
func nameListReply(recs []nameRec, format int) []byte {
	var b []byte
	if len(recs) == 0 {
		return make([]byte, 16) // dev 0: no devices
	}
	prev := -1
	for _, r := range recs {
		start := len(b)
		if prev >= 0 {
			ne.PutUint32(b[prev+8:], uint32(start-prev))
		}
		var rec []byte
		switch format {
		case 0:
			rec = make([]byte, align8(16+len(r.name)+1))
		default:
			nameEnd := align8(nameListNameOff + len(r.name) + 1)
			size := nameEnd + 8
			if format == 1 {
				size = nameEnd + align8(4)
			}
			if format == 2 && r.hasUUID {
				size += align8(len(r.uuid) + 1)
			}
			rec = make([]byte, size)
			ne.PutUint32(rec[nameEnd:], r.eventNr)
			if format == 2 {
				fl := uint32(unix.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID)
				if r.hasUUID {
					fl = unix.DM_NAME_LIST_FLAG_HAS_UUID
					copy(rec[nameEnd+8:], r.uuid)
				}
				ne.PutUint32(rec[nameEnd+4:], fl)
			}
		}
		ne.PutUint64(rec[0:], r.dev)
		copy(rec[nameListNameOff:], r.name)
		b = append(b, rec...)
		prev = start
	}
	return b
}

func TestDecodeNameList(t *testing.T) {
	recs := []nameRec{
		{kernelDev(253, 0), "pool", 3, "", false},
		{kernelDev(253, 1), "a", 0, "thin-uuid-1", true},
		{kernelDev(253, 300), strings.Repeat("x", 127), 9, strings.Repeat("u", 128), true},
	}
	for _, format := range []int{0, 1, 2} {
		got, err := decodeNameList(nameListReply(recs, format))
		if err != nil {
			t.Fatalf("format %d: %v", format, err)
		}
		if len(got) != len(recs) {
			t.Fatalf("format %d: %d devices, want %d", format, len(got), len(recs))
		}
		for i, r := range recs {
			want := Device{Name: r.name, Major: unix.Major(r.dev), Minor: unix.Minor(r.dev)}
			if format >= 1 {
				want.EventNr = r.eventNr
			}
			if format == 2 && r.hasUUID {
				want.UUID = r.uuid
			}
			if got[i] != want {
				t.Errorf("format %d device %d: got %+v want %+v", format, i, got[i], want)
			}
		}
	}
	for _, empty := range [][]byte{nameListReply(nil, 2), nil} {
		if got, err := decodeNameList(empty); err != nil || len(got) != 0 {
			t.Errorf("empty list %v: %v %v", empty, got, err)
		}
	}
}

func TestDecodeNameListMalformed(t *testing.T) {
	good := nameListReply([]nameRec{{kernelDev(253, 0), "pool", 1, "", false}, {kernelDev(253, 1), "thin", 2, "", false}}, 2)
	badNext := append([]byte(nil), good...)
	ne.PutUint32(badNext[8:], 13)
	pastEnd := append([]byte(nil), good...)
	ne.PutUint32(pastEnd[8:], uint32(len(good)+8))
	noNUL := make([]byte, 24)
	ne.PutUint64(noNUL, 5)
	copy(noNUL[12:], "abcdefghijkl")
	for name, data := range map[string][]byte{
		"short":    good[:8],
		"bad next": badNext,
		"past end": pastEnd,
		"no NUL":   noNUL,
	} {
		if _, err := decodeNameList(data); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", name, err)
		}
	}
}

func targetVersionsReply(tvs []targetVersion) []byte {
	var b []byte
	prev := -1
	for _, tv := range tvs {
		start := len(b)
		if prev >= 0 {
			ne.PutUint32(b[prev:], uint32(start-prev))
		}
		rec := make([]byte, align8(targetVersionNameOff+len(tv.Name)+1))
		ne.PutUint32(rec[4:], tv.Version.Major)
		ne.PutUint32(rec[8:], tv.Version.Minor)
		ne.PutUint32(rec[12:], tv.Version.Patch)
		copy(rec[targetVersionNameOff:], tv.Name)
		b = append(b, rec...)
		prev = start
	}
	return b
}

func TestDecodeTargetVersions(t *testing.T) {
	want := []targetVersion{
		{"thin-pool", Version{1, 23, 0}},
		{"thin", Version{1, 23, 0}},
		{"linear", Version{1, 4, 0}},
		{"striped", Version{1, 6, 0}},
	}
	got, err := decodeTargetVersions(targetVersionsReply(want))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v want %+v", got, want)
	}
	bad := targetVersionsReply(want)
	ne.PutUint32(bad[0:], 4)
	if _, err := decodeTargetVersions(bad); !errors.Is(err, ErrMalformed) {
		t.Errorf("bad next: err %v", err)
	}
}

func TestEncodeMessage(t *testing.T) {
	b := encodeMessage(7, "create_thin 12")
	if ne.Uint64(b) != 7 || cString(b[8:]) != "create_thin 12" || len(b)%8 != 0 {
		t.Errorf("message encoding %q", b)
	}
}

func TestReplyPayloadBounds(t *testing.T) {
	req, _ := newRequest("x", 0, 64)
	r := reply{buf: req.buf}
	ne.PutUint32(req.buf[offDataSize:], headerSize+10)
	if p, err := r.payload(); err != nil || len(p) != 10 {
		t.Errorf("payload %d bytes, %v", len(p), err)
	}
	for _, c := range [][2]uint32{{headerSize, uint32(len(req.buf)) + 1}, {8, headerSize}, {headerSize + 20, headerSize + 10}} {
		ne.PutUint32(req.buf[offDataStart:], c[0])
		ne.PutUint32(req.buf[offDataSize:], c[1])
		if _, err := r.payload(); !errors.Is(err, ErrMalformed) {
			t.Errorf("start %d size %d: err %v", c[0], c[1], err)
		}
	}
	// The kernel's answer with nothing after the header (a table status
	// of a device without a table): data_size is where data begins.
	ne.PutUint32(req.buf[offDataStart:], headerSize)
	ne.PutUint32(req.buf[offDataSize:], offData)
	if p, err := r.payload(); err != nil || len(p) != 0 {
		t.Errorf("empty answer: %d bytes, %v", len(p), err)
	}
}
