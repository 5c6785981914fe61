package storage

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

const (
	active    = snapshots.KindActive
	kview     = snapshots.KindView
	committed = snapshots.KindCommitted
)

// populate builds the same tree containerd's storage tests use:
// committed-1 <- committed-2, actives and views on both and on nothing.
// Every record gets its own device id; labels help the filter tests.
func populate(t testing.TB, db *DB) {
	t.Helper()
	update(t, db, func(tx *Tx) error {
		mk := func(kind snapshots.Kind, key, parent string, labels map[string]string) {
			id, err := tx.AllocateID()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: kind, Parent: parent, Labels: labels, State: StateReady, DeviceID: id, Size: 10 << 30, FSType: "ext4"}); err != nil {
				t.Fatalf("create %s: %v", key, err)
			}
		}
		commit := func(key, name string, labels map[string]string) {
			if _, err := tx.commitFresh(key, name, snapshots.Usage{Size: 1}, snapshots.WithLabels(labels)); err != nil {
				t.Fatalf("commit %s: %v", key, err)
			}
		}
		mk(active, "committed-tmp-1", "", nil)
		commit("committed-tmp-1", "committed-1", map[string]string{"layer": "1", "a.b": "c"})
		mk(active, "committed-tmp-2", "committed-1", nil)
		commit("committed-tmp-2", "committed-2", map[string]string{"layer": "2"})
		mk(active, "active-1", "", map[string]string{"role": "rw"})
		mk(active, "active-2", "committed-1", nil)
		mk(active, "active-3", "committed-2", map[string]string{"role": "rw"})
		mk(kview, "view-1", "", nil)
		mk(kview, "view-2", "committed-2", map[string]string{"role": "ro"})
		return nil
	})
}

var baseInfo = map[string]struct {
	kind   snapshots.Kind
	parent string
}{
	"committed-1": {committed, ""},
	"committed-2": {committed, "committed-1"},
	"active-1":    {active, ""},
	"active-2":    {active, "committed-1"},
	"active-3":    {active, "committed-2"},
	"view-1":      {kview, ""},
	"view-2":      {kview, "committed-2"},
}

func TestStatPopulated(t *testing.T) {
	clock := newTestClock()
	db, _ := openTestDB(t, withClock(clock.now))
	populate(t, db)
	view(t, db, func(tx *Tx) error {
		for key, want := range baseInfo {
			info, err := tx.Stat(key)
			if err != nil {
				t.Fatalf("stat %s: %v", key, err)
			}
			if info.Name != key || info.Kind != want.kind || info.Parent != want.parent {
				t.Errorf("stat %s = %+v, want kind %v parent %q", key, info, want.kind, want.parent)
			}
			if info.Created.IsZero() || info.Updated.Before(info.Created) || info.Created.After(clock.last()) {
				t.Errorf("stat %s: bad times %v %v", key, info.Created, info.Updated)
			}
		}
		for _, key := range []string{"committed-tmp-1", "committed-tmp-2", "nope"} {
			if _, err := tx.Stat(key); errKind(err) != "notfound" {
				t.Errorf("stat %s: got %v, want NotFound", key, err)
			}
		}
		return nil
	})
}

func TestCreateSnapshotErrors(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	var owned uint32
	update(t, db, func(tx *Tx) error {
		s, err := tx.GetSnapshot("active-1")
		owned = s.DeviceID
		if err != nil {
			return err
		}
		// A committed parent that is not ready.
		if _, err := tx.CreateSnapshot(Snapshot{Key: "c-tmp", Kind: active, State: StateReady}); err != nil {
			return err
		}
		if _, err := tx.commitFresh("c-tmp", "committed-removing", snapshots.Usage{}); err != nil {
			return err
		}
		_, err = tx.SetState("committed-removing", StateRemoving)
		return err
	})
	long := strings.Repeat("k", MaxKeyLen+1)
	for _, tc := range []struct {
		name string
		rec  Snapshot
		want string
	}{
		{"committed kind", Snapshot{Key: "x", Kind: committed, State: StateReady}, "invalid"},
		{"committed kind while creating", Snapshot{Key: "layer-creating", Kind: committed, State: StateCreating}, ""},
		{"unknown kind", Snapshot{Key: "x", Kind: snapshots.KindUnknown, State: StateReady}, "invalid"},
		{"empty key", Snapshot{Kind: active, State: StateReady}, "invalid"},
		{"long key", Snapshot{Key: long, Kind: active, State: StateReady}, "invalid"},
		{"zero state", Snapshot{Key: "x", Kind: active}, "invalid"},
		{"bad state", Snapshot{Key: "x", Kind: active, State: 9}, "invalid"},
		{"device id too big", Snapshot{Key: "x", Kind: active, State: StateReady, DeviceID: MaxDeviceID + 1}, "invalid"},
		{"key exists active", Snapshot{Key: "active-1", Kind: active, State: StateReady}, "exists"},
		{"key exists committed", Snapshot{Key: "committed-1", Kind: kview, State: StateReady}, "exists"},
		{"missing parent", Snapshot{Key: "x", Kind: active, Parent: "does-not-exist", State: StateReady}, "notfound"},
		{"active parent", Snapshot{Key: "x", Kind: active, Parent: "active-1", State: StateReady}, "invalid"},
		{"view parent", Snapshot{Key: "x", Kind: kview, Parent: "view-1", State: StateReady}, "invalid"},
		{"parent not ready", Snapshot{Key: "x", Kind: kview, Parent: "committed-removing", State: StateReady}, "precondition"},
		{"device id not allocated", Snapshot{Key: "x", Kind: active, State: StateReady, DeviceID: 4000}, "precondition"},
		{"device id owned", Snapshot{Key: "x", Kind: active, State: StateReady, DeviceID: owned}, "precondition"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := db.Update(t.Context(), func(tx *Tx) error {
				_, err := tx.CreateSnapshot(tc.rec)
				if got := errKind(err); got != tc.want {
					t.Errorf("got %v (%s), want %s", err, got, tc.want)
				}
				// A failed create must leave nothing behind, even in the
				// transaction that goes on to commit.
				if tc.rec.Key == "x" {
					if _, err := tx.GetSnapshot("x"); errKind(err) != "notfound" {
						t.Errorf("record written despite error: %v", err)
					}
				}
				if tc.rec.DeviceID == owned && owned != 0 {
					if o, _, _ := tx.IDOwner(owned); o != "active-1" {
						t.Errorf("owner of %d changed to %q", owned, o)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCreateSnapshotStored(t *testing.T) {
	clock := newTestClock()
	db, _ := openTestDB(t, withClock(clock.now))
	populate(t, db)
	labels := map[string]string{"k": "v"}
	var created Snapshot
	update(t, db, func(tx *Tx) error {
		id, err := tx.AllocateID()
		if err != nil {
			return err
		}
		created, err = tx.CreateSnapshot(Snapshot{Key: "new", Kind: kview, Parent: "committed-2", Labels: labels, State: StateCreating, DeviceID: id, Size: 123, FSType: "xfs"})
		return err
	})
	labels["k"] = "changed by caller"
	view(t, db, func(tx *Tx) error {
		got, err := tx.GetSnapshot("new")
		if err != nil {
			return err
		}
		if got.Labels["k"] != "v" || got.Size != 123 || got.FSType != "xfs" || got.State != StateCreating ||
			got.DeviceID != created.DeviceID || !got.Created.Equal(created.Created) || !got.Updated.Equal(created.Created) ||
			got.Parent != "committed-2" || got.Kind != kview {
			t.Errorf("stored %+v, created %+v", got, created)
		}
		if owner, used, _ := tx.IDOwner(got.DeviceID); !used || owner != "new" {
			t.Errorf("owner of %d = %q,%v", got.DeviceID, owner, used)
		}
		children, err := tx.Children("committed-2")
		if err != nil {
			return err
		}
		if !slices.Equal(children, []string{"active-3", "new", "view-2"}) {
			t.Errorf("children %v", children)
		}
		return nil
	})
}

func TestCreatingIsHidden(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	update(t, db, func(tx *Tx) error {
		for key, st := range map[string]State{"half": StateCreating, "going": StateRemoving} {
			if _, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: active, Parent: "committed-1", State: st}); err != nil {
				return err
			}
		}
		return nil
	})
	err := db.Update(t.Context(), func(tx *Tx) error {
		for _, key := range []string{"half", "going"} {
			if _, err := tx.Stat(key); errKind(err) != "notfound" {
				t.Errorf("Stat(%s) = %v, want NotFound", key, err)
			}
			if _, err := tx.UpdateInfo(snapshots.Info{Name: key}); errKind(err) != "notfound" {
				t.Errorf("UpdateInfo(%s) = %v, want NotFound", key, err)
			}
			if _, err := tx.commitFresh(key, key+"-c", snapshots.Usage{}); errKind(err) != "precondition" {
				t.Errorf("CommitActive(%s) = %v, want FailedPrecondition", key, err)
			}
			if _, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: kview, State: StateReady}); errKind(err) != "exists" {
				t.Errorf("CreateSnapshot(%s) = %v, want AlreadyExists", key, err)
			}
			if s, err := tx.GetSnapshot(key); err != nil || s.Key != key {
				t.Errorf("GetSnapshot(%s) = %+v, %v", key, s, err)
			}
		}
		var walked []string
		if err := tx.Walk(func(i snapshots.Info) error { walked = append(walked, i.Name); return nil }); err != nil {
			return err
		}
		if slices.Contains(walked, "half") || slices.Contains(walked, "going") || len(walked) != len(baseInfo) {
			t.Errorf("Walk saw %v", walked)
		}
		var all []string
		if err := tx.WalkSnapshots(func(s Snapshot) error { all = append(all, s.Key); return nil }); err != nil {
			return err
		}
		if len(all) != len(baseInfo)+2 {
			t.Errorf("WalkSnapshots saw %v", all)
		}
		if _, err := tx.SetState("half", StateReady); err != nil {
			return err
		}
		if _, err := tx.Stat("half"); err != nil {
			t.Errorf("Stat after ready: %v", err)
		}
		if _, err := tx.SetState("half", 0); errKind(err) != "invalid" {
			t.Errorf("SetState(0) = %v", err)
		}
		if _, err := tx.SetState("nope", StateReady); errKind(err) != "notfound" {
			t.Errorf("SetState(nope) = %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestWalkFilters(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	for _, tc := range []struct {
		filters []string
		want    []string
		err     string
	}{
		{nil, []string{"active-1", "active-2", "active-3", "committed-1", "committed-2", "view-1", "view-2"}, ""},
		{[]string{"kind==committed"}, []string{"committed-1", "committed-2"}, ""},
		{[]string{"kind==view"}, []string{"view-1", "view-2"}, ""},
		{[]string{"kind!=active"}, []string{"committed-1", "committed-2", "view-1", "view-2"}, ""},
		{[]string{"parent==committed-2"}, []string{"active-3", "view-2"}, ""},
		{[]string{"name==active-2"}, []string{"active-2"}, ""},
		{[]string{"name~=^view"}, []string{"view-1", "view-2"}, ""},
		{[]string{"labels.role==rw"}, []string{"active-1", "active-3"}, ""},
		{[]string{"labels.role"}, []string{"active-1", "active-3", "view-2"}, ""},
		{[]string{`labels."a.b"==c`}, []string{"committed-1"}, ""},
		{[]string{"labels.role==rw,parent==committed-2"}, []string{"active-3"}, ""},
		{[]string{"labels.role==ro", "kind==committed"}, []string{"committed-1", "committed-2", "view-2"}, ""},
		{[]string{"labels.layer~=^[0-9]$,kind==committed"}, []string{"committed-1", "committed-2"}, ""},
		{[]string{"labels.nope==x"}, nil, ""},
		{[]string{"kind=="}, nil, "invalid"},
		// containerd's filters log a bad regexp and match nothing.
		{[]string{"name~=("}, nil, ""},
	} {
		t.Run(strings.Join(tc.filters, "|"), func(t *testing.T) {
			var got []string
			err := db.View(t.Context(), func(tx *Tx) error {
				return tx.Walk(func(i snapshots.Info) error { got = append(got, i.Name); return nil }, tc.filters...)
			})
			if errKind(err) != tc.err {
				t.Fatalf("err %v, want %s", err, tc.err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
	// An error from fn stops the walk and is returned as is.
	stop := fmt.Errorf("stop")
	n := 0
	err := db.View(t.Context(), func(tx *Tx) error {
		return tx.Walk(func(snapshots.Info) error { n++; return stop })
	})
	if !errors.Is(err, stop) || n != 1 {
		t.Errorf("walk stop: %v after %d", err, n)
	}
}

func TestCommitActive(t *testing.T) {
	clock := newTestClock()
	db, _ := openTestDB(t, withClock(clock.now))
	populate(t, db)
	var before, got Snapshot
	update(t, db, func(tx *Tx) error {
		var err error
		if before, err = tx.GetSnapshot("active-2"); err != nil {
			return err
		}
		got, err = tx.commitFresh("active-2", "committed-3", snapshots.Usage{Size: 4096, Inodes: 7}, snapshots.WithLabels(map[string]string{"new": "label"}))
		return err
	})
	view(t, db, func(tx *Tx) error {
		if _, err := tx.GetSnapshot("active-2"); errKind(err) != "notfound" {
			t.Errorf("active key still there: %v", err)
		}
		s, err := tx.GetSnapshot("committed-3")
		if err != nil {
			return err
		}
		if s.DeviceID == before.DeviceID || s.Size != before.Size || s.FSType != before.FSType || s.Kind != committed ||
			s.Parent != "committed-1" || s.State != StateReady || s.Usage != (snapshots.Usage{Size: 4096, Inodes: 7}) ||
			len(s.Labels) != 1 || s.Labels["new"] != "label" || !s.Created.After(before.Created) || !s.Updated.Equal(s.Created) {
			t.Errorf("committed %+v from %+v", s, before)
		}
		if !s.Created.Equal(got.Created) || s.DeviceID != got.DeviceID {
			t.Errorf("returned %+v, stored %+v", got, s)
		}
		if owner, _, _ := tx.IDOwner(s.DeviceID); owner != "committed-3" {
			t.Errorf("id owner %q", owner)
		}
		children, _ := tx.Children("committed-1")
		if !slices.Equal(children, []string{"committed-2", "committed-3"}) {
			t.Errorf("children of committed-1: %v", children)
		}
		return nil
	})
}

// TestCommitActiveIDs: the committed snapshot takes the new id, the
// active's id stays allocated without an owner; a bad new id changes nothing.
func TestCommitActiveIDs(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	var before Snapshot
	var fresh uint32
	update(t, db, func(tx *Tx) (err error) {
		if before, err = tx.GetSnapshot("active-2"); err != nil {
			return err
		}
		fresh, err = tx.AllocateID()
		return err
	})
	err := db.Update(t.Context(), func(tx *Tx) error {
		_, err := tx.CommitActive("active-2", "committed-3", before.DeviceID, snapshots.Usage{})
		return err
	})
	if errKind(err) != "precondition" {
		t.Errorf("commit onto the active's own (owned) id: %v", err)
	}
	update(t, db, func(tx *Tx) error {
		s, err := tx.CommitActive("active-2", "committed-3", fresh, snapshots.Usage{Size: 1})
		if err != nil {
			return err
		}
		if s.DeviceID != fresh || s.Kind != committed || s.Usage.Size != 1 || s.Size != before.Size {
			t.Errorf("committed %+v", s)
		}
		return nil
	})
	view(t, db, func(tx *Tx) error {
		if owner, used, _ := tx.IDOwner(fresh); !used || owner != "committed-3" {
			t.Errorf("new id owner %q (used %v)", owner, used)
		}
		if owner, used, _ := tx.IDOwner(before.DeviceID); !used || owner != "" {
			t.Errorf("old id owner %q (used %v), want allocated and unowned", owner, used)
		}
		if s, err := tx.GetSnapshot("committed-3"); err != nil || s.DeviceID != fresh {
			t.Errorf("stored %+v %v", s, err)
		}
		return nil
	})
}

func TestCommitActiveErrors(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	update(t, db, func(tx *Tx) error {
		_, err := tx.CreateSnapshot(Snapshot{Key: "creating", Kind: active, State: StateCreating})
		return err
	})
	for _, tc := range []struct {
		name, key, target string
		opts              []snapshots.Opt
		want              string
	}{
		{"name exists", "active-1", "committed-1", nil, "exists"},
		{"name is key", "active-1", "active-1", nil, "exists"},
		{"empty name", "active-1", "", nil, "invalid"},
		{"missing key", "nope", "c", nil, "notfound"},
		{"view", "view-1", "c", nil, "precondition"},
		{"committed", "committed-1", "c", nil, "precondition"},
		{"not ready", "creating", "c", nil, "precondition"},
		{"rebase onto missing", "active-1", "c", []snapshots.Opt{snapshots.WithParent("nonexist")}, "notfound"},
		{"rebase onto active", "active-1", "c", []snapshots.Opt{snapshots.WithParent("active-3")}, "precondition"},
		{"change parent", "active-2", "c", []snapshots.Opt{snapshots.WithParent("committed-2")}, "invalid"},
		{"rebase parentless", "active-1", "c", []snapshots.Opt{snapshots.WithParent("committed-2")}, ""},
		{"same parent", "active-2", "c", []snapshots.Opt{snapshots.WithParent("committed-1")}, ""},
		{"keep parent", "active-3", "c", []snapshots.Opt{snapshots.WithParent("")}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := db.Update(t.Context(), func(tx *Tx) error {
				before, _ := tx.GetSnapshot(tc.key)
				s, err := tx.commitFresh(tc.key, tc.target, snapshots.Usage{}, tc.opts...)
				if got := errKind(err); got != tc.want {
					t.Errorf("got %v (%s), want %s", err, got, tc.want)
				}
				if err != nil {
					if after, _ := tx.GetSnapshot(tc.key); after.Key != before.Key || after.Kind != before.Kind {
						t.Errorf("failed commit changed %s: %+v", tc.key, after)
					}
					return errAbort
				}
				var want string
				for _, o := range tc.opts {
					var i snapshots.Info
					_ = o(&i)
					want = i.Parent
				}
				if want == "" {
					want = before.Parent
				}
				if s.Parent != want {
					t.Errorf("parent %q, want %q", s.Parent, want)
				}
				if want != "" {
					children, _ := tx.Children(want)
					if !slices.Contains(children, "c") || slices.Contains(children, tc.key) {
						t.Errorf("children of %s: %v", want, children)
					}
					if _, err := tx.RemoveSnapshot(want); errKind(err) != "precondition" {
						t.Errorf("removing parent %s: %v", want, err)
					}
				}
				return errAbort // keep the fixture for the next case
			})
			if !errors.Is(err, errAbort) {
				t.Fatal(err)
			}
		})
	}
}

func TestRemoveSnapshot(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	for _, tc := range []struct {
		key, want string
	}{
		{"committed-1", "precondition"},
		{"committed-2", "precondition"},
		{"nope", "notfound"},
		{"view-2", ""},
		{"active-3", ""},
		{"committed-2", ""},
		{"committed-2", "notfound"},
		{"active-2", ""},
		{"committed-1", ""},
	} {
		var removed Snapshot
		err := db.Update(t.Context(), func(tx *Tx) error {
			var err error
			removed, err = tx.RemoveSnapshot(tc.key)
			return err
		})
		if got := errKind(err); got != tc.want {
			t.Fatalf("remove %s: %v (%s), want %s", tc.key, err, got, tc.want)
		}
		if err != nil {
			continue
		}
		view(t, db, func(tx *Tx) error {
			if removed.Key != tc.key || removed.DeviceID == 0 {
				t.Errorf("removed %+v", removed)
			}
			owner, used, err := tx.IDOwner(removed.DeviceID)
			if err != nil || !used || owner != "" {
				t.Errorf("device %d after remove: owner %q used %v err %v", removed.DeviceID, owner, used, err)
			}
			if removed.Parent != "" {
				children, _ := tx.Children(removed.Parent)
				if slices.Contains(children, tc.key) {
					t.Errorf("%s still child of %s", tc.key, removed.Parent)
				}
			}
			return nil
		})
	}
}

func TestUpdateInfo(t *testing.T) {
	clock := newTestClock()
	db, _ := openTestDB(t, withClock(clock.now))
	populate(t, db)
	update(t, db, func(tx *Tx) error {
		_, err := tx.UpdateInfo(snapshots.Info{Name: "active-1", Labels: map[string]string{"a": "1", "b": "2", "c": "3"}})
		return err
	})
	for _, tc := range []struct {
		name   string
		info   snapshots.Info
		paths  []string
		labels map[string]string
		err    string
	}{
		{"replace all", snapshots.Info{Labels: map[string]string{"x": "y"}}, nil, map[string]string{"x": "y"}, ""},
		{"replace by path", snapshots.Info{Labels: map[string]string{"x": "y"}}, []string{"labels"}, map[string]string{"x": "y"}, ""},
		{"clear", snapshots.Info{}, nil, map[string]string{}, ""},
		{"one label", snapshots.Info{Labels: map[string]string{"a": "new", "b": "ignored"}}, []string{"labels.a"}, map[string]string{"a": "new", "b": "2", "c": "3"}, ""},
		{"absent label deletes", snapshots.Info{}, []string{"labels.b"}, map[string]string{"a": "1", "c": "3"}, ""},
		{"dotted label", snapshots.Info{Labels: map[string]string{"x.y": "z"}}, []string{"labels.x.y"}, map[string]string{"a": "1", "b": "2", "c": "3", "x.y": "z"}, ""},
		{"kind", snapshots.Info{Kind: committed}, []string{"kind"}, nil, "invalid"},
		{"parent", snapshots.Info{Parent: "committed-1"}, []string{"labels.a", "parent"}, nil, "invalid"},
		{"name", snapshots.Info{}, []string{"name"}, nil, "invalid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := db.Update(t.Context(), func(tx *Tx) error {
				before, _ := tx.Stat("active-1")
				tc.info.Name = "active-1"
				// Kind and parent in info are ignored without a fieldpath.
				tc.info.Kind, tc.info.Parent = committed, "committed-2"
				got, err := tx.UpdateInfo(tc.info, tc.paths...)
				if errKind(err) != tc.err {
					t.Fatalf("err %v, want %s", err, tc.err)
				}
				if err != nil {
					return errAbort
				}
				stored, _ := tx.Stat("active-1")
				for _, i := range []snapshots.Info{got, stored} {
					if i.Kind != active || i.Parent != "" || !i.Created.Equal(before.Created) || !i.Updated.After(before.Updated) {
						t.Errorf("info %+v before %+v", i, before)
					}
					if len(i.Labels) != len(tc.labels) {
						t.Errorf("labels %v, want %v", i.Labels, tc.labels)
					}
					for k, v := range tc.labels {
						if lv, ok := i.Labels[k]; !ok || lv != v {
							t.Errorf("labels %v, want %v", i.Labels, tc.labels)
						}
					}
				}
				return errAbort
			})
			if !errors.Is(err, errAbort) {
				t.Fatal(err)
			}
		})
	}
	err := db.Update(t.Context(), func(tx *Tx) error {
		_, err := tx.UpdateInfo(snapshots.Info{Name: "nope"})
		return err
	})
	if errKind(err) != "notfound" {
		t.Errorf("update missing: %v", err)
	}
}

func TestChildrenIndex(t *testing.T) {
	db, _ := openTestDB(t)
	// Parents whose names prefix each other, and keys with odd bytes, must
	// not leak into each other's children.
	parents := []string{"a", "ab", "a\x00", "\x01a", "a\x01a"}
	update(t, db, func(tx *Tx) error {
		for _, p := range parents {
			if _, err := tx.CreateSnapshot(Snapshot{Key: p + "-tmp", Kind: active, State: StateReady}); err != nil {
				return err
			}
			if _, err := tx.commitFresh(p+"-tmp", p, snapshots.Usage{}); err != nil {
				return err
			}
			for _, c := range []string{"1", "b", "\x00"} {
				if _, err := tx.CreateSnapshot(Snapshot{Key: p + "/" + c, Kind: kview, Parent: p, State: StateReady}); err != nil {
					return err
				}
			}
		}
		return nil
	})
	view(t, db, func(tx *Tx) error {
		for _, p := range parents {
			got, err := tx.Children(p)
			if err != nil {
				return err
			}
			want := []string{p + "/\x00", p + "/1", p + "/b"}
			if !slices.Equal(got, want) {
				t.Errorf("children(%q) = %q, want %q", p, got, want)
			}
			leaf, err := tx.Children(p + "/1")
			if err != nil || len(leaf) != 0 {
				t.Errorf("children of leaf: %v %v", leaf, err)
			}
		}
		if _, err := tx.Children("missing"); errKind(err) != "notfound" {
			t.Errorf("children of missing: %v", err)
		}
		return nil
	})
}

func TestReadOnlyTx(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	for name, fn := range map[string]func(tx *Tx) error{
		"CreateSnapshot": func(tx *Tx) error {
			_, err := tx.CreateSnapshot(Snapshot{Key: "x", Kind: active, State: StateReady})
			return err
		},
		"CommitActive":     func(tx *Tx) error { _, err := tx.commitFresh("active-1", "c", snapshots.Usage{}); return err },
		"RemoveSnapshot":   func(tx *Tx) error { _, err := tx.RemoveSnapshot("view-1"); return err },
		"UpdateInfo":       func(tx *Tx) error { _, err := tx.UpdateInfo(snapshots.Info{Name: "view-1"}); return err },
		"SetState":         func(tx *Tx) error { _, err := tx.SetState("view-1", StateRemoving); return err },
		"AllocateID":       func(tx *Tx) error { _, err := tx.AllocateID(); return err },
		"ReserveID":        func(tx *Tx) error { return tx.ReserveID(999) },
		"ReleaseID":        func(tx *Tx) error { return tx.ReleaseID(1) },
		"AddJournal":       func(tx *Tx) error { _, err := tx.AddJournal(Entry{Op: OpDelete}); return err },
		"FinishJournal":    func(tx *Tx) error { return tx.FinishJournal(1) },
		"SetTransactionID": func(tx *Tx) error { return tx.SetTransactionID(1) },
		"SetPoolInfo":      func(tx *Tx) error { return tx.SetPoolInfo(PoolInfo{}) },
	} {
		t.Run(name, func(t *testing.T) {
			err := db.View(t.Context(), func(tx *Tx) error {
				if tx.tx.Writable() {
					t.Error("view tx is writable")
				}
				return fn(tx)
			})
			if errKind(err) != "precondition" {
				t.Errorf("got %v, want FailedPrecondition", err)
			}
		})
	}
}

// TestSharedViews counts the views of a parent without a device of their
// own, whatever their state, and nothing else.
func TestSharedViews(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	update(t, db, func(tx *Tx) error {
		for _, s := range []Snapshot{
			{Key: "v1", Kind: kview, Parent: "committed-1", State: StateReady},
			{Key: "v2", Kind: kview, Parent: "committed-1", State: StateCreating},
			{Key: "v3", Kind: kview, Parent: "committed-2", State: StateReady},
		} {
			if _, err := tx.CreateSnapshot(s); err != nil {
				return err
			}
		}
		return nil
	})
	view(t, db, func(tx *Tx) error {
		for parent, want := range map[string]int{"committed-1": 2, "committed-2": 1, "missing": 0} {
			if n, err := tx.SharedViews(parent); err != nil || n != want {
				t.Errorf("SharedViews(%s) = %d, %v; want %d", parent, n, err, want)
			}
		}
		return nil
	})
}

// TestOnlyCommittedChild finds a parent's committed child only when it is
// the one: actives and views do not count, two committed children are
// none.
func TestOnlyCommittedChild(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	mk := func(tx *Tx, kind snapshots.Kind, key, parent string) error {
		id, err := tx.AllocateID()
		if err != nil {
			return err
		}
		_, err = tx.CreateSnapshot(Snapshot{Key: key, Kind: kind, Parent: parent, State: StateReady, DeviceID: id})
		return err
	}
	update(t, db, func(tx *Tx) error {
		return errors.Join(mk(tx, kview, "v1", "committed-2"), mk(tx, active, "other-tmp", "committed-2"))
	})
	for _, c := range []struct {
		name, parent, want string
		commit             bool // commit other-tmp first: committed-2's second committed child
	}{
		{name: "a layer with one", parent: "committed-1", want: "committed-2"},
		{name: "actives and views only", parent: "committed-2"},
		{name: "missing", parent: "missing"},
		{name: "two", parent: "committed-2", commit: true},
		{name: "one beside an active", parent: "committed-1", want: "committed-2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.commit {
				update(t, db, func(tx *Tx) error {
					if _, err := tx.commitFresh("other-tmp", "other", snapshots.Usage{}); err != nil {
						return err
					}
					if err := mk(tx, active, "third-tmp", "committed-2"); err != nil {
						return err
					}
					_, err := tx.commitFresh("third-tmp", "third", snapshots.Usage{})
					return err
				})
			}
			view(t, db, func(tx *Tx) error {
				got, ok, err := tx.OnlyCommittedChild(c.parent)
				if err != nil || ok != (c.want != "") || got.Key != c.want {
					t.Errorf("OnlyCommittedChild(%s) = %q, %v, %v; want %q", c.parent, got.Key, ok, err, c.want)
				}
				return nil
			})
		})
	}
}

// TestCommitID: an active snapshot's reserved commit id is owned by its
// record, passes to the committed snapshot on commit and loses its owner
// when the active is removed instead.
func TestCommitID(t *testing.T) {
	db, _ := openTestDB(t)
	populate(t, db)
	var dev, reserved, other uint32
	update(t, db, func(tx *Tx) error {
		var err error
		for _, p := range []*uint32{&dev, &reserved, &other} {
			if *p, err = tx.AllocateID(); err != nil {
				return err
			}
		}
		for _, tc := range []struct {
			s    Snapshot
			want string
		}{
			{Snapshot{Key: "bad-kind", Kind: kview, State: StateReady, CommitID: reserved}, "invalid"},
			{Snapshot{Key: "same", Kind: active, State: StateReady, DeviceID: dev, CommitID: dev}, "invalid"},
			{Snapshot{Key: "unallocated", Kind: active, State: StateReady, CommitID: 999}, "precondition"},
			{Snapshot{Key: "a", Kind: active, State: StateReady, DeviceID: dev, CommitID: reserved}, ""},
		} {
			if _, err := tx.CreateSnapshot(tc.s); errKind(err) != tc.want {
				t.Errorf("CreateSnapshot(%s) = %v, want %q", tc.s.Key, err, tc.want)
			}
		}
		if owner, _, _ := tx.IDOwner(reserved); owner != "a" {
			t.Errorf("reserved id owned by %q", owner)
		}
		if _, err := tx.SetCommitID("a", other); errKind(err) != "precondition" {
			t.Errorf("a second commit id: %v", err)
		}
		c, err := tx.CommitActive("a", "c", reserved, snapshots.Usage{})
		if err != nil {
			return err
		}
		if c.DeviceID != reserved || c.CommitID != 0 {
			t.Errorf("committed %+v", c)
		}
		for id, want := range map[uint32]string{reserved: "c", dev: ""} {
			if owner, used, _ := tx.IDOwner(id); owner != want || !used {
				t.Errorf("id %d owned by %q (%v), want %q", id, owner, used, want)
			}
		}
		// Cleared: the id stays allocated without an owner.
		if _, err := tx.CreateSnapshot(Snapshot{Key: "x", Kind: active, State: StateReady, CommitID: dev}); err != nil {
			return err
		}
		if id, err := tx.ClearCommitID("x"); err != nil || id != dev {
			t.Errorf("ClearCommitID = %d, %v; want %d", id, err, dev)
		}
		if owner, used, _ := tx.IDOwner(dev); owner != "" || !used {
			t.Errorf("cleared commit id owned by %q (%v)", owner, used)
		}
		// Reserved later, then removed: both ids lose their owner.
		if _, err := tx.CreateSnapshot(Snapshot{Key: "b", Kind: active, State: StateReady}); err != nil {
			return err
		}
		if _, err := tx.SetCommitID("b", other); err != nil {
			return err
		}
		b, err := tx.RemoveSnapshot("b")
		if err != nil || b.CommitID != other {
			t.Errorf("removed %+v, %v", b, err)
		}
		if owner, used, _ := tx.IDOwner(other); owner != "" || !used {
			t.Errorf("commit id of a removed snapshot owned by %q (%v)", owner, used)
		}
		return nil
	})
}
