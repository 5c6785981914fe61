package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// rawUpdate changes a closed database file with bbolt directly, the way an
// older or newer program would have written it.
func rawUpdate(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	bdb, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	if err := bdb.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func rawView(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	if err := bdb.View(fn); err != nil {
		t.Fatal(err)
	}
}

// schemaOf returns the version stamped in the closed database at path.
func schemaOf(t *testing.T, path string) uint32 {
	t.Helper()
	var v uint32
	rawView(t, path, func(tx *bolt.Tx) error {
		raw := tx.Bucket(bucketMeta).Get(metaSchema)
		if len(raw) != 4 {
			t.Fatalf("schema value %x", raw)
		}
		v = binary.BigEndian.Uint32(raw)
		return nil
	})
	return v
}

func setSchema(t *testing.T, path string, v uint32) {
	t.Helper()
	rawUpdate(t, path, func(tx *bolt.Tx) error { return putSchema(tx, v) })
}

// create makes a fresh database at path as version schema and closes it.
func create(t *testing.T, path string, schema uint32) {
	t.Helper()
	db, err := Open(context.Background(), path, withSchema(schema, nil))
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
}

func TestOpenSchema(t *testing.T) {
	ctx := context.Background()
	var calls []string
	marks := []byte("test-marks")
	mark := func(name string) migration {
		return func(tx *bolt.Tx) error {
			calls = append(calls, name)
			b, err := tx.CreateBucketIfNotExists(marks)
			if err != nil {
				return err
			}
			return b.Put([]byte(name), []byte{1})
		}
	}
	open := func(path string, schema uint32, migs ...migration) error {
		db, err := Open(ctx, path, withSchema(schema, migs))
		if err == nil {
			db.Close()
		}
		return err
	}

	t.Run("fresh", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		db, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		db.Close()
		if v := schemaOf(t, path); v != schemaVersion {
			t.Errorf("version %d, want %d", v, schemaVersion)
		}
		rawView(t, path, func(tx *bolt.Tx) error {
			n := 0
			_ = tx.ForEach(func([]byte, *bolt.Bucket) error { n++; return nil })
			if n != len(allBuckets) {
				t.Errorf("%d buckets, want %d", n, len(allBuckets))
			}
			return nil
		})
	})
	t.Run("newer than known", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		create(t, path, schemaVersion)
		setSchema(t, path, schemaVersion+1)
		_, err := Open(ctx, path)
		if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "newer") {
			t.Errorf("open newer schema: %v", err)
		}
		if v := schemaOf(t, path); v != schemaVersion+1 {
			t.Errorf("version changed to %d", v)
		}
	})
	t.Run("migrate in order", func(t *testing.T) {
		calls = nil
		path := filepath.Join(t.TempDir(), "db")
		create(t, path, 1)
		if err := open(path, 3, mark("1to2"), mark("2to3")); err != nil {
			t.Fatal(err)
		}
		if v := schemaOf(t, path); v != 3 {
			t.Errorf("version %d after migration", v)
		}
		if len(calls) != 2 || calls[0] != "1to2" || calls[1] != "2to3" {
			t.Errorf("migrations ran %v", calls)
		}
		// Already current: nothing runs again.
		if err := open(path, 3, mark("again"), mark("again")); err != nil || len(calls) != 2 {
			t.Errorf("reopen: %v, calls %v", err, calls)
		}
	})
	t.Run("missing migration", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		create(t, path, 1)
		if err := open(path, 3, mark("1to2")); !errdefs.IsFailedPrecondition(err) {
			t.Errorf("open without migration: %v", err)
		}
		if v := schemaOf(t, path); v != 1 {
			t.Errorf("version changed to %d", v)
		}
		setSchema(t, path, 0)
		if _, err := Open(ctx, path); !errdefs.IsFailedPrecondition(err) {
			t.Errorf("open version 0: %v", err)
		}
	})
	t.Run("failed migration rolls back", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "db")
		create(t, path, 1)
		broken := errors.New("migration broke")
		failing := func(tx *bolt.Tx) error {
			if err := mark("partial")(tx); err != nil {
				return err
			}
			return broken
		}
		if err := open(path, 2, failing); !errors.Is(err, broken) {
			t.Fatalf("open with failing migration: %v", err)
		}
		if v := schemaOf(t, path); v != 1 {
			t.Errorf("version changed to %d", v)
		}
		rawView(t, path, func(tx *bolt.Tx) error {
			if tx.Bucket(marks) != nil {
				t.Error("failed migration left a write behind")
			}
			return nil
		})
	})
}

// schema1Fixture copies testdata/schema1.db, written by the code of commit
// 75866ef (see testdata/schema1_gen.go), and checks it is what that code
// writes: schema 1, a kv bucket and records led by their format byte.
func schema1Fixture(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "schema1.db"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "schema1.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if v := schemaOf(t, path); v != 1 {
		t.Fatalf("fixture has schema %d", v)
	}
	rawView(t, path, func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("kv")) == nil {
			t.Error("fixture has no kv bucket")
		}
		for _, name := range [][]byte{bucketSnapshots, bucketJournal} {
			_ = tx.Bucket(name).ForEach(func(k, v []byte) error {
				if v[0] != formatV1 {
					t.Errorf("fixture %s %x does not start with the format byte", name, k)
				}
				return nil
			})
		}
		if v := tx.Bucket(bucketMeta).Get(metaPool); v[0] != formatV1 {
			t.Error("fixture pool info does not start with the format byte")
		}
		return nil
	})
	return path
}

// TestMigrateSchema1 opens a database the previous schema wrote and checks
// every record survives.
func TestMigrateSchema1(t *testing.T) {
	ctx := context.Background()
	path := schema1Fixture(t)
	db, err := Open(ctx, path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	at := func(sec int) time.Time { return time.Date(2026, 1, 2, 3, 4, sec, 0, time.UTC) }
	const size = 64 << 20
	wantSnapshots := []Snapshot{
		{Key: "layer1", Kind: committed, Labels: map[string]string{"containerd.io/snapshot.ref": "sha256:1111"},
			Created: at(8), Updated: at(8), State: StateReady, DeviceID: 2, Size: size, FSType: "ext4",
			Usage: snapshots.Usage{Size: 4096, Inodes: 3}},
		{Key: "layer2", Kind: committed, Parent: "layer1", Labels: map[string]string{"a": "1", "b": ""},
			Created: at(10), Updated: at(11), State: StateReady, DeviceID: 3, Size: size, FSType: "ext4",
			Usage: snapshots.Usage{Size: 8192, Inodes: 5}, Shared: 1234},
		{Key: "leaving", Kind: kview, Parent: "layer2", Created: at(19), Updated: at(19), State: StateRemoving,
			DeviceID: 8, Size: size, FSType: "ext4"},
		{Key: "new", Kind: active, Parent: "layer2", Created: at(14), Updated: at(14), State: StateCreating,
			DeviceID: 6, Size: size, FSType: "ext4"},
		{Key: "ro", Kind: kview, Parent: "layer1", Created: at(13), Updated: at(13), State: StateReady,
			DeviceID: 5, Size: size, FSType: "ext4"},
		{Key: "work", Kind: active, Parent: "layer2", Labels: map[string]string{"containerd.io/snapshot/cri.container": "yes"},
			Created: at(12), Updated: at(12), State: StateReady, DeviceID: 4, Size: size, FSType: "ext4"},
	}
	wantChildren := map[string][]string{"layer1": {"layer2", "ro"}, "layer2": {"leaving", "new", "work"}}
	wantJournal := []Entry{
		{Seq: 2, Op: OpCreateSnap, DeviceID: 6, OriginID: 3, Key: "new", Created: at(15)},
		{Seq: 3, Op: OpDelete, DeviceID: 7, Key: "gone", Created: at(17)},
		{Seq: 4, Op: OpCommit, DeviceID: 4, Key: "work", Name: "work-c", Created: at(18)},
	}
	wantIDs := map[uint32]string{1: "", 2: "layer1", 3: "layer2", 4: "work", 5: "ro", 6: "new", 7: "", 8: "leaving", 100: ""}
	wantPool := PoolInfo{Name: "tp", Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), BaseDeviceID: 1, BaseSize: size, BaseFSType: "ext4"}

	check := func(t *testing.T, db *DB) {
		t.Helper()
		view(t, db, func(tx *Tx) error {
			var got []Snapshot
			if err := tx.WalkSnapshots(func(s Snapshot) error { got = append(got, s); return nil }); err != nil {
				return err
			}
			if !reflect.DeepEqual(got, wantSnapshots) {
				t.Errorf("snapshots:\n got %+v\nwant %+v", got, wantSnapshots)
			}
			for _, s := range wantSnapshots {
				children, err := tx.Children(s.Key)
				if err != nil {
					return err
				}
				if !reflect.DeepEqual(children, wantChildren[s.Key]) {
					t.Errorf("children of %s: %v, want %v", s.Key, children, wantChildren[s.Key])
				}
			}
			journal, err := tx.Journal()
			if err != nil {
				return err
			}
			if !reflect.DeepEqual(journal, wantJournal) {
				t.Errorf("journal:\n got %+v\nwant %+v", journal, wantJournal)
			}
			ids := map[uint32]string{}
			if err := tx.WalkIDs(func(id uint32, owner string) error { ids[id] = owner; return nil }); err != nil {
				return err
			}
			if !reflect.DeepEqual(ids, wantIDs) {
				t.Errorf("ids %v, want %v", ids, wantIDs)
			}
			if pool, err := tx.PoolInfo(); err != nil || pool != wantPool {
				t.Errorf("pool info %+v %v, want %+v", pool, err, wantPool)
			}
			if txid, err := tx.TransactionID(); err != nil || txid != 7 {
				t.Errorf("transaction id %d %v", txid, err)
			}
			return nil
		})
	}
	check(t, db)
	// The id allocator and the journal sequence carry on where they were:
	// released id 9 first, then the mark (10), and sequence 5.
	err = db.Update(ctx, func(tx *Tx) error {
		for _, want := range []uint32{9, 10} {
			if id, err := tx.AllocateID(); err != nil || id != want {
				t.Errorf("allocated %d %v, want %d", id, err, want)
			}
		}
		if seq, err := tx.AddJournal(Entry{Op: OpDelete, DeviceID: 9}); err != nil || seq != 5 {
			t.Errorf("journal seq %d %v, want 5", seq, err)
		}
		return errAbort
	})
	if !errors.Is(err, errAbort) {
		t.Fatal(err)
	}
	db.Close()

	if v := schemaOf(t, path); v != schemaVersion {
		t.Errorf("schema %d after migration, want %d", v, schemaVersion)
	}
	rawView(t, path, func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("kv")) != nil {
			t.Error("kv bucket survived the migration")
		}
		return nil
	})
	// Opening again finds version 2 and migrates nothing.
	db, err = Open(ctx, path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	check(t, db)
}

// TestMigrateSchema1Refused: a schema 1 database holding what schema 2
// cannot represent, or damaged, is refused and left untouched.
func TestMigrateSchema1Refused(t *testing.T) {
	put := func(bucket, key []byte, change func(v []byte) []byte) func(tx *bolt.Tx) error {
		return func(tx *bolt.Tx) error {
			b := tx.Bucket(bucket)
			return b.Put(key, change(bytes.Clone(b.Get(key))))
		}
	}
	entry4 := u64Key(4)
	for _, tc := range []struct {
		name   string
		change func(tx *bolt.Tx) error
		kind   string
	}{
		{"kv value", func(tx *bolt.Tx) error { return tx.Bucket([]byte("kv")).Put([]byte("k"), []byte{1, 'v'}) }, "precondition"},
		// Data is the last field: the empty one is the final 0 length.
		{"entry data", put(bucketJournal, entry4, func(v []byte) []byte { return append(v[:len(v)-1], 1, 'd') }), "precondition"},
		{"entry op activate", put(bucketJournal, entry4, func(v []byte) []byte { v[1] = 4; return v }), "precondition"},
		{"entry op unknown", put(bucketJournal, entry4, func(v []byte) []byte { v[1] = 200; return v }), "precondition"},
		{"entry format", put(bucketJournal, entry4, func(v []byte) []byte { v[0] = 2; return v }), "dataloss"},
		{"entry truncated", put(bucketJournal, entry4, func(v []byte) []byte { return v[:len(v)-2] }), "dataloss"},
		// After the format byte and the name "tp": the data device.
		{"pool data device", put(bucketMeta, metaPool, func(v []byte) []byte {
			return append(append(bytes.Clone(v[:4]), 1, 'd'), v[5:]...)
		}), "precondition"},
		{"pool truncated", put(bucketMeta, metaPool, func(v []byte) []byte { return v[:len(v)-1] }), "dataloss"},
		{"snapshot format", put(bucketSnapshots, []byte("work"), func(v []byte) []byte { v[0] = 9; return v }), "dataloss"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := schema1Fixture(t)
			rawUpdate(t, path, tc.change)
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			db, err := Open(context.Background(), path)
			if err == nil {
				db.Close()
			}
			if errKind(err) != tc.kind {
				t.Errorf("open: %v, want %s", err, tc.kind)
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, before) {
				t.Errorf("refused migration changed the file (%v)", err)
			}
		})
	}
}

// FuzzSchema1Records checks that whatever journal entry or pool info the
// schema 1 conversion accepts, the next schemas' decoders read.
func FuzzSchema1Records(f *testing.F) {
	for _, e := range sampleEntries {
		f.Add(append(append([]byte{formatV1}, encodeEntryV4(&e)...), 0))
	}
	for _, p := range samplePools {
		name := encoder{}
		name.string(p.Name)
		v4 := encodePoolInfo(&p)
		v4 = v4[:len(v4)-1] // without IDsScanned
		f.Add(append(append(append([]byte{formatV1}, name.b...), 0, 0, 0), v4[len(name.b):]...))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if v, err := entryFromV1(u64Key(1), b); err == nil {
			if _, err := entryFromV4(1, v); err != nil {
				t.Fatalf("converted entry %x to %x, which does not decode: %v", b, v, err)
			}
		}
		if v, err := poolInfoFromV1(b); err == nil {
			if _, err := decodePoolInfo(poolInfoFromV4(v)); err != nil {
				t.Fatalf("converted pool info %x to %x, which does not decode: %v", b, v, err)
			}
		}
	})
}

// TestMigrateSchema3 opens a database version 3 wrote: every record stays,
// foreign ids included, and the journal takes the op version 4 added.
func TestMigrateSchema3(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := Open(ctx, path, WithNoSync(), withSchema(3, migrations[:2]))
	if err != nil {
		t.Fatal(err)
	}
	var want []Entry
	update(t, db, func(tx *Tx) error {
		id, err := tx.AllocateID()
		if err != nil {
			return err
		}
		if _, err := tx.CreateSnapshot(Snapshot{Key: "a", Kind: active, State: StateReady, DeviceID: id, Size: 1 << 20, FSType: "ext4"}); err != nil {
			return err
		}
		if err := tx.MarkForeign(5); err != nil {
			return err
		}
		return nil
	})
	db.Close()
	// A fresh file gets today's buckets and encoding; version 3 had no
	// warm bucket and journaled a transaction id.
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		e := Entry{Op: OpDelete, DeviceID: 7, Key: "gone", Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
		j := tx.Bucket(bucketJournal)
		var err error
		if e.Seq, err = j.NextSequence(); err != nil {
			return err
		}
		want = append(want, e)
		if err := j.Put(u64Key(e.Seq), encodeEntryV4(&e)); err != nil {
			return err
		}
		// Records had no CommitID, the last field today.
		if err := rewriteBucket(tx, bucketSnapshots, func(_, v []byte) ([]byte, error) { return v[:len(v)-1], nil }); err != nil {
			return err
		}
		return tx.DeleteBucket(bucketWarm)
	})
	if v := schemaOf(t, path); v != 3 {
		t.Fatalf("fixture has schema %d", v)
	}
	db, err = Open(ctx, path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if v := schemaOf2(t, db); v != schemaVersion {
		t.Errorf("schema %d after migration, want %d", v, schemaVersion)
	}
	update(t, db, func(tx *Tx) error {
		if s, err := tx.GetSnapshot("a"); err != nil || s.DeviceID != 1 || s.Kind != active {
			t.Errorf("snapshot a = %+v, %v", s, err)
		}
		if ids, err := tx.ForeignIDs(); err != nil || !reflect.DeepEqual(ids, []uint32{5}) {
			t.Errorf("foreign %v %v, want [5]", ids, err)
		}
		if got, err := tx.Journal(); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("journal %+v %v, want %+v", got, err, want)
		}
		_, err := tx.AddJournal(Entry{Op: OpCommitSnap, DeviceID: 2, OriginID: 1, Key: "a", Name: "l"})
		return err
	})
}

// schemaOf2 reads the schema version through an open database.
func schemaOf2(t *testing.T, db *DB) (v uint32) {
	t.Helper()
	if err := db.db.View(func(tx *bolt.Tx) error {
		v = binary.BigEndian.Uint32(tx.Bucket(bucketMeta).Get(metaSchema))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return v
}

// encodeEntryV4 encodes e as schemas 2 to 4 did: a transaction id (0)
// after the origin.
func encodeEntryV4(en *Entry) []byte {
	e := encoder{}
	e.byte(byte(en.Op))
	e.uvarint(uint64(en.DeviceID))
	e.uvarint(uint64(en.OriginID))
	e.uvarint(0)
	e.uvarint(en.Size)
	e.time(en.Created)
	e.string(en.Key)
	e.string(en.Name)
	return e.b
}

// schema4Fixture copies testdata/schema4.db, written by the code of commit
// b57b1ea (see testdata/schema4_gen.go): schema 4, warm devices in the
// journal.
func schema4Fixture(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "schema4.db"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "schema4.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if v := schemaOf(t, path); v != 4 {
		t.Fatalf("fixture has schema %d", v)
	}
	warm := 0
	rawView(t, path, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketWarm) != nil {
			t.Error("fixture has a warm bucket")
		}
		return tx.Bucket(bucketJournal).ForEach(func(k, v []byte) error {
			if Op(v[0]) == opWarmV4 {
				warm++
			}
			return nil
		})
	})
	if warm != 2 {
		t.Fatalf("fixture journal has %d warm entries, want 2", warm)
	}
	return path
}

// TestMigrateSchema4 opens a database the previous schema wrote: its warm
// entries become warm records, the other entries stay (without their
// transaction id), and every record and id survives.
func TestMigrateSchema4(t *testing.T) {
	ctx := context.Background()
	path := schema4Fixture(t)
	db, err := Open(ctx, path, WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if v := schemaOf2(t, db); v != schemaVersion {
		t.Errorf("schema %d after migration, want %d", v, schemaVersion)
	}
	at := func(sec int) time.Time { return time.Date(2026, 1, 2, 3, 4, sec, 0, time.UTC) }
	const size = 64 << 20
	wantWarm := []Warm{
		{DeviceID: 2, Parent: "layer1", OriginID: 3, Size: size, Created: at(9)},
		{DeviceID: 8, Parent: "layer2", Size: size, Created: at(14)},
	}
	wantJournal := []Entry{
		{Seq: 4, Op: OpCreateSnap, DeviceID: 9, OriginID: 5, Key: "new", Created: at(16)},
		{Seq: 5, Op: OpDelete, DeviceID: 10, OriginID: 3, Key: "gone", Size: size, Created: at(18)},
		{Seq: 6, Op: OpCommitSnap, DeviceID: 11, OriginID: 6, Key: "work", Name: "work-c", Size: size, Created: at(19)},
	}
	wantKeys := []string{"layer1", "layer2", "new", "ro", "work"}
	wantIDs := map[uint32]string{1: "", 2: "", 3: "layer1", 4: "", 5: "layer2", 6: "work", 7: "ro", 8: "", 9: "new", 10: "", 11: "", 12: ""}
	update(t, db, func(tx *Tx) error {
		if got, err := tx.WarmDevices(); err != nil || !reflect.DeepEqual(got, wantWarm) {
			t.Errorf("warm devices:\n got %+v %v\nwant %+v", got, err, wantWarm)
		}
		if got, err := tx.Journal(); err != nil || !reflect.DeepEqual(got, wantJournal) {
			t.Errorf("journal:\n got %+v %v\nwant %+v", got, err, wantJournal)
		}
		var keys []string
		if err := tx.WalkSnapshots(func(s Snapshot) error { keys = append(keys, s.Key); return nil }); err != nil {
			return err
		}
		if !reflect.DeepEqual(keys, wantKeys) {
			t.Errorf("records %v, want %v", keys, wantKeys)
		}
		ids := map[uint32]string{}
		if err := tx.WalkIDs(func(id uint32, owner string) error { ids[id] = owner; return nil }); err != nil {
			return err
		}
		if !reflect.DeepEqual(ids, wantIDs) {
			t.Errorf("ids %v, want %v", ids, wantIDs)
		}
		if f, err := tx.ForeignIDs(); err != nil || !reflect.DeepEqual(f, []uint32{12}) {
			t.Errorf("foreign ids %v %v, want [12]", f, err)
		}
		wantPool := PoolInfo{Name: "tp", Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), BaseDeviceID: 1, BaseSize: size, BaseFSType: "ext4"}
		if pi, err := tx.PoolInfo(); err != nil || pi != wantPool {
			t.Errorf("pool info %+v %v, want %+v", pi, err, wantPool)
		}
		// The next entry continues the journal's sequence.
		seq, err := tx.AddJournal(Entry{Op: OpDelete, DeviceID: 4})
		if err != nil || seq != 7 {
			t.Errorf("next journal entry %d %v, want 7", seq, err)
		}
		return nil
	})
}

// TestMigrateSchema4Refuses: a schema 4 database whose warm entries a
// schema 5 bucket cannot hold is refused and left as it was.
func TestMigrateSchema4Refuses(t *testing.T) {
	ctx := context.Background()
	for name, entry := range map[string]Entry{
		"no parent": {Op: opWarmV4, DeviceID: 3},
		"no device": {Op: opWarmV4, Key: "l"},
	} {
		t.Run(name, func(t *testing.T) {
			path := schema4Fixture(t)
			rawUpdate(t, path, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketJournal).Put(u64Key(99), encodeEntryV4(&entry))
			})
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Open(ctx, path, WithNoSync()); !errdefs.IsDataLoss(err) {
				t.Fatalf("open: %v, want DataLoss", err)
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, before) {
				t.Errorf("refused migration changed the file (%v)", err)
			}
		})
	}
}
