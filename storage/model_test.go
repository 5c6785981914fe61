package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

var (
	modelSeeds = flag.Int("storage.model.seeds", 20, "number of seeds for TestModel")
	modelOps   = flag.Int("storage.model.ops", 2000, "operations per seed for TestModel")
	modelSeed  = flag.Uint64("storage.model.seed", 0, "run TestModel for this one seed only")
)

// model is the specification of the database in plain maps. Every
// operation is applied to both; after every transaction the whole database
// is compared with the model.
type model struct {
	snaps   map[string]Snapshot
	used    map[uint32]string // id -> owner
	free    map[uint32]bool   // released ids below next
	next    uint32            // lowest id never handed out by allocation
	journal []Entry
	lastSeq uint64
	txid    uint64
}

func newModel() *model {
	return &model{snaps: map[string]Snapshot{}, used: map[uint32]string{}, free: map[uint32]bool{}, next: 1}
}

func (m *model) clone() *model {
	c := *m
	c.snaps = maps.Clone(m.snaps)
	c.used = maps.Clone(m.used)
	c.free = maps.Clone(m.free)
	c.journal = slices.Clone(m.journal)
	return &c
}

func (m *model) children(key string) []string {
	var out []string
	for k, s := range m.snaps {
		if s.Parent == key {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

func (m *model) allocate() (uint32, string) {
	if len(m.free) > 0 {
		id := slices.Min(slices.Collect(maps.Keys(m.free)))
		delete(m.free, id)
		m.used[id] = ""
		return id, ""
	}
	id := m.next
	for {
		if _, ok := m.used[id]; !ok {
			break
		}
		id++
	}
	if id > MaxDeviceID {
		return 0, "exhausted"
	}
	m.next = id + 1
	m.used[id] = ""
	return id, ""
}

func (m *model) reserve(id uint32) string {
	if id == 0 || id > MaxDeviceID {
		return "invalid"
	}
	if _, ok := m.used[id]; ok {
		return "exists"
	}
	delete(m.free, id)
	m.used[id] = ""
	return ""
}

func (m *model) release(id uint32) string {
	if id == 0 || id > MaxDeviceID {
		return "invalid"
	}
	owner, ok := m.used[id]
	if !ok {
		return "notfound"
	}
	if owner != "" {
		return "precondition"
	}
	delete(m.used, id)
	if id < m.next {
		m.free[id] = true
	}
	return ""
}

func (m *model) parentCheck(parent, notCommitted string) string {
	p, ok := m.snaps[parent]
	if !ok {
		return "notfound"
	}
	if p.Kind != committed {
		return notCommitted
	}
	if p.State != StateReady {
		return "precondition"
	}
	return ""
}

func (m *model) create(s Snapshot) string {
	switch {
	case s.Kind != active && s.Kind != kview && (s.Kind != committed || s.State != StateCreating),
		s.Key == "", !s.State.valid(), s.DeviceID > MaxDeviceID:
		return "invalid"
	}
	if s.Parent != "" {
		if e := m.parentCheck(s.Parent, "invalid"); e != "" {
			return e
		}
	}
	if _, ok := m.snaps[s.Key]; ok {
		return "exists"
	}
	if s.DeviceID != 0 {
		if owner, ok := m.used[s.DeviceID]; !ok || owner != "" {
			return "precondition"
		}
		m.used[s.DeviceID] = s.Key
	}
	m.snaps[s.Key] = s
	return ""
}

func (m *model) commit(key, name, newParent string, id uint32) (Snapshot, string) {
	if name == "" {
		return Snapshot{}, "invalid"
	}
	if _, ok := m.snaps[name]; ok {
		return Snapshot{}, "exists"
	}
	s, ok := m.snaps[key]
	if !ok {
		return Snapshot{}, "notfound"
	}
	if s.Kind != active || s.State != StateReady {
		return Snapshot{}, "precondition"
	}
	if newParent != "" && newParent != s.Parent {
		if s.Parent != "" {
			return Snapshot{}, "invalid"
		}
		s.Parent = newParent
	}
	if s.Parent != "" {
		if e := m.parentCheck(s.Parent, "precondition"); e != "" {
			return Snapshot{}, e
		}
	}
	delete(m.snaps, key)
	s.Key, s.Kind = name, committed
	if s.DeviceID != 0 {
		m.used[s.DeviceID] = ""
	}
	m.used[id] = name
	s.DeviceID = id
	return s, ""
}

func (m *model) remove(key string) (Snapshot, string) {
	s, ok := m.snaps[key]
	if !ok {
		return Snapshot{}, "notfound"
	}
	if len(m.children(key)) > 0 {
		return Snapshot{}, "precondition"
	}
	delete(m.snaps, key)
	if s.DeviceID != 0 && m.used[s.DeviceID] == key {
		m.used[s.DeviceID] = ""
	}
	return s, ""
}

func sameSnapshot(a, b Snapshot) bool {
	return a.Key == b.Key && a.Kind == b.Kind && a.Parent == b.Parent && maps.Equal(a.Labels, b.Labels) &&
		a.Created.Equal(b.Created) && a.Updated.Equal(b.Updated) && a.State == b.State && a.DeviceID == b.DeviceID &&
		a.Size == b.Size && a.FSType == b.FSType && a.Usage == b.Usage
}

// modelRun drives one seeded sequence.
type modelRun struct {
	t     *testing.T
	rng   *rand.Rand
	m     *model
	db    *DB
	path  string
	clock *testClock
	log   []string           // recent operations, printed on failure
	stats map[string]*[2]int // per operation: successes, failures
}

var modelKeys = func() []string {
	var k []string
	for i := range 24 {
		k = append(k, fmt.Sprintf("k%d", i))
	}
	return append(k, "k1\x00", "k", "")
}()

func (r *modelRun) key() string { return modelKeys[r.rng.IntN(len(modelKeys))] }

// pick returns, with probability 3/4, a random existing key that matches
// ok (sorted first so runs are reproducible), otherwise any key.
func (r *modelRun) pick(ok func(s Snapshot) bool) string {
	if r.rng.IntN(4) > 0 {
		var keys []string
		for k, s := range r.m.snaps {
			if ok(s) {
				keys = append(keys, k)
			}
		}
		if len(keys) > 0 {
			slices.Sort(keys)
			return keys[r.rng.IntN(len(keys))]
		}
	}
	return r.key()
}

// fresh returns, with probability 3/4, a key not in use.
func (r *modelRun) fresh() string {
	if r.rng.IntN(4) > 0 {
		var keys []string
		for _, k := range modelKeys {
			if _, ok := r.m.snaps[k]; !ok && k != "" {
				keys = append(keys, k)
			}
		}
		if len(keys) > 0 {
			return keys[r.rng.IntN(len(keys))]
		}
	}
	return r.key()
}

func isCommitted(s Snapshot) bool { return s.Kind == committed && s.State == StateReady }
func isActive(s Snapshot) bool    { return s.Kind == active && s.State == StateReady }
func isReady(s Snapshot) bool     { return s.State == StateReady }

func (r *modelRun) labels() map[string]string {
	n := r.rng.IntN(3)
	if n == 0 {
		return nil
	}
	l := map[string]string{}
	for range n {
		l[fmt.Sprintf("l%d", r.rng.IntN(3))] = fmt.Sprintf("v%d", r.rng.IntN(3))
	}
	return l
}

func (r *modelRun) id() uint32 {
	switch r.rng.IntN(10) {
	case 0:
		return 0
	case 1:
		return MaxDeviceID + uint32(r.rng.IntN(2))
	}
	return uint32(1 + r.rng.IntN(40))
}

func (r *modelRun) failf(format string, args ...any) {
	r.t.Helper()
	tail := r.log
	if len(tail) > 30 {
		tail = tail[len(tail)-30:]
	}
	r.t.Fatalf("%s\nlast operations:\n  %s", fmt.Sprintf(format, args...), strings.Join(tail, "\n  "))
}

func (r *modelRun) check(op string, got error, want string) {
	r.t.Helper()
	r.log = append(r.log, fmt.Sprintf("%s -> %q", op, want))
	name, _, _ := strings.Cut(op, " ")
	if r.stats[name] == nil {
		r.stats[name] = new([2]int)
	}
	if want == "" {
		r.stats[name][0]++
	} else {
		r.stats[name][1]++
	}
	if errKind(got) != want {
		r.failf("%s: got %v, model says %q", op, got, want)
	}
}

// step applies one random operation inside tx.
func (r *modelRun) step(tx *Tx) {
	m := r.m
	switch n := r.rng.IntN(100); {
	case n < 25: // create, usually with a freshly allocated device
		s := Snapshot{Key: r.fresh(), Kind: []snapshots.Kind{active, kview, committed}[r.rng.IntN(3)%3],
			State: State(r.rng.IntN(4)), Labels: r.labels(), Size: r.rng.Uint64(), FSType: "ext4"}
		if r.rng.IntN(10) == 0 {
			s.Kind = active
		}
		if r.rng.IntN(4) == 0 && s.State != 0 {
			s.State = StateReady
		}
		if r.rng.IntN(3) > 0 {
			s.Parent = r.pick(isCommitted)
		}
		if r.rng.IntN(2) == 0 {
			id, err := tx.AllocateID()
			want, werr := m.allocate()
			r.check("allocate for create", err, werr)
			if id != want {
				r.failf("allocate = %d, model %d", id, want)
			}
			s.DeviceID = id
		} else {
			s.DeviceID = r.id()
		}
		got, err := tx.CreateSnapshot(s)
		op := fmt.Sprintf("create %q kind=%v parent=%q state=%v id=%d", s.Key, s.Kind, s.Parent, s.State, s.DeviceID)
		if err == nil {
			if got.Created.IsZero() || !got.Updated.Equal(got.Created) {
				r.failf("%s: times %v %v", op, got.Created, got.Updated)
			}
			s.Created, s.Updated = got.Created, got.Updated
		}
		r.check(op, err, m.create(s))
	case n < 37: // commit
		key, name := r.pick(isActive), r.fresh()
		var opts []snapshots.Opt
		newParent := ""
		if r.rng.IntN(4) == 0 {
			newParent = r.pick(isCommitted)
			opts = append(opts, snapshots.WithParent(newParent))
		}
		labels := r.labels()
		opts = append(opts, snapshots.WithLabels(labels))
		usage := snapshots.Usage{Size: r.rng.Int64(), Inodes: r.rng.Int64N(1000)}
		before := m.snaps[key]
		id, err := tx.AllocateID()
		wantID, werr := m.allocate()
		r.check("allocate for commit", err, werr)
		if id != wantID {
			r.failf("allocate for commit = %d, model %d", id, wantID)
		}
		if werr != "" {
			break
		}
		got, err := tx.CommitActive(key, name, id, usage, opts...)
		want, werr := m.commit(key, name, newParent, id)
		r.check(fmt.Sprintf("commit %q -> %q parent=%q", key, name, newParent), err, werr)
		if err == nil {
			if !got.Created.After(before.Created) || !got.Updated.Equal(got.Created) {
				r.failf("commit times %v %v after %v", got.Created, got.Updated, before.Created)
			}
			want.Labels, want.Usage, want.Created, want.Updated = labels, usage, got.Created, got.Updated
			if !sameSnapshot(got, want) {
				r.failf("commit returned %+v, model %+v", got, want)
			}
			m.snaps[name] = want
		}
	case n < 50: // remove, often releasing the device as the snapshotter does
		key := r.pick(func(s Snapshot) bool { return len(r.m.children(s.Key)) == 0 })
		got, err := tx.RemoveSnapshot(key)
		want, werr := m.remove(key)
		r.check(fmt.Sprintf("remove %q", key), err, werr)
		if err == nil {
			if !sameSnapshot(got, want) {
				r.failf("remove returned %+v, model %+v", got, want)
			}
			if got.DeviceID != 0 && r.rng.IntN(3) > 0 {
				err := tx.ReleaseID(got.DeviceID)
				r.check(fmt.Sprintf("release removed %d", got.DeviceID), err, m.release(got.DeviceID))
			}
		}
	case n < 57: // state changes, mostly to ready
		key, st := r.pick(func(s Snapshot) bool { return !isReady(s) }), StateReady
		if r.rng.IntN(3) == 0 {
			st = State(r.rng.IntN(5))
		}
		_, err := tx.SetState(key, st)
		want := ""
		if s, ok := m.snaps[key]; !st.valid() {
			want = "invalid"
		} else if !ok {
			want = "notfound"
		} else {
			s.State = st
			m.snaps[key] = s
		}
		r.check(fmt.Sprintf("set state %q %v", key, st), err, want)
	case n < 65: // label updates
		key := r.pick(isReady)
		info := snapshots.Info{Name: key, Labels: r.labels(), Kind: committed, Parent: "ignored"}
		var paths []string
		for range r.rng.IntN(3) {
			paths = append(paths, []string{"labels", "labels.l0", "labels.l1", "labels.l9", "kind", "parent"}[r.rng.IntN(6)])
		}
		got, err := tx.UpdateInfo(info, paths...)
		s, ok := m.snaps[key]
		want := ""
		if !ok || s.State != StateReady {
			want = "notfound"
		} else {
			l := maps.Clone(s.Labels)
			if len(paths) == 0 {
				l = maps.Clone(info.Labels)
			}
			for _, p := range paths {
				switch {
				case p == "labels":
					l = maps.Clone(info.Labels)
				case strings.HasPrefix(p, "labels."):
					if v, ok := info.Labels[p[7:]]; ok {
						if l == nil {
							l = map[string]string{}
						}
						l[p[7:]] = v
					} else {
						delete(l, p[7:])
					}
				default:
					want = "invalid"
				}
			}
			if want == "" {
				if !got.Updated.After(s.Updated) || !got.Created.Equal(s.Created) {
					r.failf("update %q times %v %v, before %v %v", key, got.Created, got.Updated, s.Created, s.Updated)
				}
				s.Labels, s.Updated = l, got.Updated
				m.snaps[key] = s
			}
		}
		r.check(fmt.Sprintf("update %q %v %v", key, info.Labels, paths), err, want)
	case n < 70:
		id, err := tx.AllocateID()
		want, werr := m.allocate()
		r.check("allocate", err, werr)
		if id != want {
			r.failf("allocate = %d, model %d", id, want)
		}
	case n < 75:
		id := r.id()
		r.check(fmt.Sprintf("reserve %d", id), tx.ReserveID(id), m.reserve(id))
	case n < 82:
		id := r.id()
		r.check(fmt.Sprintf("release %d", id), tx.ReleaseID(id), m.release(id))
	case n < 90:
		e := Entry{Op: Op(r.rng.IntN(11)), DeviceID: r.id(), OriginID: uint32(r.rng.IntN(50)), Key: r.key()}
		seq, err := tx.AddJournal(e)
		want := ""
		switch {
		case e.Op != OpCreateThin && e.Op != OpCreateSnap && e.Op != OpDelete && e.Op != OpCommit && e.Op != OpCommitSnap,
			e.DeviceID > MaxDeviceID:
			want = "invalid"
		}
		r.check(fmt.Sprintf("journal %v", e), err, want)
		if err == nil {
			if seq <= m.lastSeq {
				r.failf("journal seq %d after %d", seq, m.lastSeq)
			}
			got, _ := tx.GetJournal(seq)
			e.Seq, e.Created, m.lastSeq = seq, got.Created, seq
			m.journal = append(m.journal, e)
		}
	case n < 96:
		seq := m.lastSeq + 1
		if len(m.journal) > 0 && r.rng.IntN(4) > 0 {
			seq = m.journal[r.rng.IntN(len(m.journal))].Seq
		}
		want := "notfound"
		if i := slices.IndexFunc(m.journal, func(e Entry) bool { return e.Seq == seq }); i >= 0 {
			m.journal = slices.Delete(m.journal, i, i+1)
			want = ""
		}
		r.check(fmt.Sprintf("finish %d", seq), tx.FinishJournal(seq), want)
	default:
		v := r.rng.Uint64()
		r.check(fmt.Sprintf("txid %d", v), tx.SetTransactionID(v), "")
		m.txid = v
	}
}

// verify compares the whole database with the model.
func (r *modelRun) verify() {
	r.t.Helper()
	m := r.m
	err := r.db.View(context.Background(), func(tx *Tx) error {
		seen := map[string]bool{}
		if err := tx.WalkSnapshots(func(s Snapshot) error {
			want, ok := m.snaps[s.Key]
			if !ok || !sameSnapshot(s, want) {
				r.failf("db has %+v, model %+v (%v)", s, want, ok)
			}
			seen[s.Key] = true
			return nil
		}); err != nil {
			return err
		}
		if len(seen) != len(m.snaps) {
			r.failf("db has %d records, model %d", len(seen), len(m.snaps))
		}
		var ready, walked []string
		for k, s := range m.snaps {
			if s.State == StateReady {
				ready = append(ready, k)
			}
			children, err := tx.Children(k)
			if err != nil || !slices.Equal(children, m.children(k)) {
				r.failf("children(%q) = %q %v, model %q", k, children, err, m.children(k))
			}
			if _, err := tx.Stat(k); (err == nil) != (s.State == StateReady) {
				r.failf("stat %q: %v with state %v", k, err, s.State)
			}
		}
		slices.Sort(ready)
		if err := tx.Walk(func(i snapshots.Info) error { walked = append(walked, i.Name); return nil }); err != nil {
			return err
		}
		if !slices.Equal(ready, walked) {
			r.failf("walk %q, model %q", walked, ready)
		}
		// One filtered walk per check, against a filter the model can
		// evaluate directly.
		l := fmt.Sprintf("v%d", r.rng.IntN(3))
		var want, got []string
		for _, k := range ready {
			if s := m.snaps[k]; s.Kind == committed || s.Labels["l0"] == l {
				want = append(want, k)
			}
		}
		if err := tx.Walk(func(i snapshots.Info) error { got = append(got, i.Name); return nil }, "kind==committed", "labels.l0=="+l); err != nil {
			return err
		}
		if !slices.Equal(want, got) {
			r.failf("filtered walk %q, model %q", got, want)
		}

		ids := map[uint32]string{}
		if err := tx.WalkIDs(func(id uint32, owner string) error { ids[id] = owner; return nil }); err != nil {
			return err
		}
		if !maps.Equal(ids, m.used) {
			r.failf("used ids %v, model %v", ids, m.used)
		}
		free := map[uint32]bool{}
		c := tx.free.Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			free[uint32(k[0])<<24|uint32(k[1])<<16|uint32(k[2])<<8|uint32(k[3])] = true
		}
		if !maps.Equal(free, m.free) {
			r.failf("free ids %v, model %v", free, m.free)
		}
		if next, _ := tx.nextID(); next != m.next {
			r.failf("next id %d, model %d", next, m.next)
		}
		journal, err := tx.Journal()
		if err != nil {
			return err
		}
		if len(journal) != len(m.journal) {
			r.failf("journal %v, model %v", journal, m.journal)
		}
		for i := range journal {
			a, b := journal[i], m.journal[i]
			if a.Seq != b.Seq || a.Op != b.Op || a.DeviceID != b.DeviceID || a.OriginID != b.OriginID || a.Key != b.Key || !a.Created.Equal(b.Created) {
				r.failf("journal[%d] = %v, model %v", i, a, b)
			}
		}
		if txid, err := tx.TransactionID(); err != nil || txid != m.txid {
			r.failf("txid %d %v, model %d", txid, err, m.txid)
		}
		return nil
	})
	if err != nil {
		r.failf("verify: %v", err)
	}
}

// jumpIDs moves the allocation mark near the top of the id space so the
// second half of a run also meets exhaustion.
func (r *modelRun) jumpIDs() {
	const mark = MaxDeviceID - 3
	if r.m.next >= mark {
		return
	}
	err := r.db.Update(context.Background(), func(tx *Tx) error {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], mark)
		return tx.meta.Put(metaNextID, b[:])
	})
	if err != nil {
		r.failf("jump: %v", err)
	}
	// Ids between the old and the new mark were never handed out; they are
	// free for ReserveID but allocation will not return them.
	r.m.next = mark
	r.log = append(r.log, "jump ids")
}

func (r *modelRun) reopen() {
	if err := r.db.Close(); err != nil {
		r.failf("close: %v", err)
	}
	db, err := Open(context.Background(), r.path, WithNoSync(), withClock(r.clock.now))
	if err != nil {
		r.failf("reopen: %v", err)
	}
	r.db = db
	r.log = append(r.log, "reopen")
}

func runModel(t *testing.T, seed uint64, ops int) {
	clock := newTestClock()
	path := filepath.Join(t.TempDir(), "model.db")
	db, err := Open(context.Background(), path, WithNoSync(), withClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	r := &modelRun{t: t, rng: rand.New(rand.NewPCG(seed, 0x5eed)), m: newModel(), db: db, path: path, clock: clock, stats: map[string]*[2]int{}}
	defer func() { r.db.Close() }()
	jumped := false
	for done := 0; done < ops; {
		if r.rng.IntN(150) == 0 {
			r.reopen()
		}
		if !jumped && done >= ops/2 {
			r.jumpIDs()
			jumped = true
		}
		// Mostly one operation per transaction, sometimes several, and
		// sometimes a transaction that is thrown away.
		n := 1
		if r.rng.IntN(4) == 0 {
			n = 2 + r.rng.IntN(5)
		}
		abort := r.rng.IntN(15) == 0
		saved := r.m.clone()
		err := r.db.Update(context.Background(), func(tx *Tx) error {
			for range n {
				r.step(tx)
			}
			if abort {
				return errAbort
			}
			return nil
		})
		if abort {
			if !errors.Is(err, errAbort) {
				r.failf("aborted update returned %v", err)
			}
			r.m = saved
			r.log = append(r.log, "(aborted)")
		} else if err != nil {
			r.failf("update: %v", err)
		}
		done += n
		r.verify()
	}
	var summary []string
	for _, name := range slices.Sorted(maps.Keys(r.stats)) {
		summary = append(summary, fmt.Sprintf("%s %d/%d", name, r.stats[name][0], r.stats[name][1]))
	}
	t.Logf("ok/failed: %s", strings.Join(summary, ", "))
	// A long run that never got an operation through (or never saw it
	// refused) did not test it; the generator needs fixing then.
	if ops >= 1000 {
		for _, name := range []string{"create", "commit", "remove", "release", "set", "update", "allocate", "reserve", "journal", "finish"} {
			if st := r.stats[name]; st == nil || st[0] == 0 || st[1] == 0 {
				t.Errorf("operation %s not exercised both ways: %v", name, st)
			}
		}
	}
}

// TestModel runs long random operation sequences against the model;
// -storage.model.seeds and -storage.model.ops scale it up, and
// -storage.model.seed replays a single seed.
func TestModel(t *testing.T) {
	seeds := make([]uint64, 0, *modelSeeds)
	if *modelSeed != 0 {
		seeds = append(seeds, *modelSeed)
	} else {
		for i := range *modelSeeds {
			seeds = append(seeds, uint64(i+1))
		}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Parallel()
			runModel(t, seed, *modelOps)
		})
	}
}
