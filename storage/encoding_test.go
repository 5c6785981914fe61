package storage

import (
	"bytes"
	"reflect"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

var sampleSnapshots = []Snapshot{
	{Key: "k", Kind: active, State: StateCreating, DeviceID: 7, CommitID: MaxDeviceID},
	{Key: "default/12/sha256:abc", Kind: committed, State: StateReady, Parent: "default/11/sha256:def",
		Labels:  map[string]string{"containerd.io/snapshot.ref": "sha256:abc", "": "empty key", "e": ""},
		Created: time.Date(2026, 11, 27, 1, 2, 3, 999999999, time.UTC), Updated: time.Date(2027, 1, 1, 0, 0, 0, 1, time.UTC),
		DeviceID: MaxDeviceID, Size: 1<<64 - 1, FSType: "ext4", Usage: snapshots.Usage{Size: -1, Inodes: 1 << 62}, Shared: 1<<64 - 1},
	{Key: "v", Kind: kview, State: StateRemoving, Created: time.Unix(-5, 3).UTC()},
}

var sampleEntries = []Entry{
	{Seq: 1, Op: OpCreateThin},
	{Seq: 1<<64 - 1, Op: OpCommit, DeviceID: MaxDeviceID, OriginID: 1, Key: "a", Name: "b", Size: 42,
		Created: time.Date(2026, 1, 1, 0, 0, 0, 5, time.UTC)},
}

var samplePools = []PoolInfo{
	{},
	{Name: "pool", Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), BaseDeviceID: 1, BaseSize: 10 << 30, BaseFSType: "xfs", IDsScanned: true},
}

func TestSnapshotRoundTrip(t *testing.T) {
	for _, s := range sampleSnapshots {
		b := encodeSnapshot(&s)
		got, err := decodeSnapshot(s.Key, b)
		if err != nil {
			t.Fatalf("%s: %v", s.Key, err)
		}
		if !reflect.DeepEqual(got, s) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, s)
		}
		// Every strict prefix is truncated and must fail, not panic.
		for n := range len(b) {
			if _, err := decodeSnapshot(s.Key, b[:n]); errKind(err) != "dataloss" {
				t.Errorf("%s: prefix %d decoded: %v", s.Key, n, err)
			}
		}
		if _, err := decodeSnapshot(s.Key, append(bytes.Clone(b), 0)); err == nil {
			t.Errorf("%s: trailing byte accepted", s.Key)
		}
	}
}

func TestSnapshotDecodeInvalid(t *testing.T) {
	valid := encodeSnapshot(&sampleSnapshots[1])
	for name, mutate := range map[string]func(b []byte){
		"kind zero":  func(b []byte) { b[0] = 0 },
		"kind high":  func(b []byte) { b[0] = 4 },
		"state zero": func(b []byte) { b[1] = 0 },
		"state high": func(b []byte) { b[1] = 4 },
	} {
		b := bytes.Clone(valid)
		mutate(b)
		if _, err := decodeSnapshot("k", b); errKind(err) != "dataloss" {
			t.Errorf("%s: %v", name, err)
		}
	}
	// A device id above 24 bits.
	s := sampleSnapshots[0]
	s.DeviceID = MaxDeviceID + 1
	if _, err := decodeSnapshot("k", encodeSnapshot(&s)); err == nil {
		t.Error("device id out of range accepted")
	}
	// A label count far beyond the input must not allocate for it.
	e := encoder{}
	e.byte(byte(active))
	e.byte(byte(StateReady))
	for range 8 { // device id, size, created, updated, usage
		e.uvarint(0)
	}
	e.string("") // parent
	e.string("") // fs type
	e.uvarint(1 << 60)
	if _, err := decodeSnapshot("k", e.b); err == nil {
		t.Error("huge label count accepted")
	}
}

func TestEntryRoundTrip(t *testing.T) {
	for _, en := range sampleEntries {
		b := encodeEntry(&en)
		got, err := decodeEntry(en.Seq, b)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, en) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, en)
		}
		for n := range len(b) {
			if _, err := decodeEntry(en.Seq, b[:n]); errKind(err) != "dataloss" {
				t.Errorf("prefix %d decoded: %v", n, err)
			}
		}
	}
	// Ops never journaled, including those schema 1 named.
	for _, op := range []Op{0, 4, 5, 7, 255} {
		b := encodeEntry(&Entry{Op: op})
		if _, err := decodeEntry(1, b); errKind(err) != "dataloss" {
			t.Errorf("%s decoded: %v", op, err)
		}
	}
}

func TestPoolInfoRoundTrip(t *testing.T) {
	for _, p := range samplePools {
		b := encodePoolInfo(&p)
		got, err := decodePoolInfo(b)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, p) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, p)
		}
		for n := range len(b) {
			if _, err := decodePoolInfo(b[:n]); errKind(err) != "dataloss" {
				t.Errorf("prefix %d decoded: %v", n, err)
			}
		}
	}
}

// The fuzz targets check that decoders never panic and that whatever they
// accept survives an encode/decode round trip unchanged.

func FuzzDecodeSnapshot(f *testing.F) {
	for _, s := range sampleSnapshots {
		f.Add(s.Key, encodeSnapshot(&s))
	}
	f.Add("", []byte{})
	f.Add("x", []byte{1, 2, 2, 0xff, 0xff, 0xff, 0xff, 0x10})
	f.Fuzz(func(t *testing.T, key string, b []byte) {
		s, err := decodeSnapshot(key, b)
		if err != nil {
			return
		}
		again, err := decodeSnapshot(key, encodeSnapshot(&s))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !reflect.DeepEqual(again, s) {
			t.Fatalf("round trip changed %+v to %+v", s, again)
		}
	})
}

func FuzzDecodeEntry(f *testing.F) {
	for _, e := range sampleEntries {
		f.Add(e.Seq, encodeEntry(&e))
	}
	f.Add(uint64(0), []byte{1})
	f.Add(uint64(0), []byte{4, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, seq uint64, b []byte) {
		e, err := decodeEntry(seq, b)
		if err != nil {
			return
		}
		again, err := decodeEntry(seq, encodeEntry(&e))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !reflect.DeepEqual(again, e) {
			t.Fatalf("round trip changed %+v to %+v", e, again)
		}
	})
}

func FuzzDecodePoolInfo(f *testing.F) {
	for _, p := range samplePools {
		f.Add(encodePoolInfo(&p))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := decodePoolInfo(b)
		if err != nil {
			return
		}
		again, err := decodePoolInfo(encodePoolInfo(&p))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !reflect.DeepEqual(again, p) {
			t.Fatalf("round trip changed %+v to %+v", p, again)
		}
	})
}

// FuzzChildKey checks the property the children index relies on: a child
// entry matches a parent's scan prefix exactly when it was filed under
// that parent.
func FuzzChildKey(f *testing.F) {
	f.Add("a", "b", "ab")
	f.Add("a\x00", "x", "a")
	f.Add("\x01a", "b", "\x01")
	f.Fuzz(func(t *testing.T, parent, child, other string) {
		k := childKey(parent, child)
		if !bytes.HasPrefix(k, childPrefix(parent)) {
			t.Fatal("child key lacks own prefix")
		}
		if bytes.HasPrefix(k, childPrefix(other)) != (other == parent) {
			t.Fatalf("childKey(%q,%q) vs prefix of %q", parent, child, other)
		}
	})
}
