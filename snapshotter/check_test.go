package snapshotter

import (
	"context"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// The fake pool lists its metadata and tables like dmPool.

const fakePoolDev = "253:0"

// ReserveMetadata keeps the ids of the moment, as a metadata snapshot does;
// one at a time, as the kernel allows.
func (p *fakePool) ReserveMetadata() (metadataSnapshot, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.noTools {
		return nil, fmt.Errorf("neither thin_ls nor thin_dump found: %w", errdefs.ErrNotImplemented)
	}
	if p.metaSnap {
		return nil, errno("message reserve_metadata_snap", p.name, unix.EBUSY)
	}
	p.metaSnap = true
	p.reserved++
	return &fakeMetaSnap{p: p, ids: p.idsLocked()}, nil
}

func (p *fakePool) ReleaseMetadata() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.metaSnap {
		return errno("message release_metadata_snap", p.name, unix.EINVAL)
	}
	p.metaSnap = false
	return nil
}

type fakeMetaSnap struct {
	p   *fakePool
	ids []uint32
}

func (m *fakeMetaSnap) ThinIDs(context.Context) ([]uint32, error) {
	m.p.mu.Lock()
	during := m.p.onThinIDs
	m.p.mu.Unlock()
	if during != nil {
		during()
	}
	return m.ids, nil
}

func (m *fakeMetaSnap) Release() error {
	m.p.mu.Lock()
	defer m.p.mu.Unlock()
	m.p.metaSnap = false
	return nil
}

func (p *fakePool) ThinTarget(name string) (dmsetup.ThinParams, dmsetup.Sectors, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.devices[name]
	if !ok {
		return dmsetup.ThinParams{}, 0, errno("table", name, unix.ENXIO)
	}
	return dmsetup.ThinParams{PoolDev: fakePoolDev, ID: d.id}, d.sectors, nil
}

func (p *fakePool) PoolDevice() string { return fakePoolDev }

// checkFixture is a stopped snapshotter's state: active "a" and "b" (b a
// child of committed "c"), view "v" of "c", which shares c's device.
type checkFixture struct {
	root string
	pool *fakePool
	db   *storage.DB
	ids  map[string]uint32 // key → thin id
	// commitIDs are the ids reserved for the active snapshots' commits.
	commitIDs map[string]uint32
	base      uint32
	// extra is an id a test case made, for its expectations.
	extra uint32
}

func (f *checkFixture) dev(key string) string { return fmt.Sprintf("tp-snap-%d", f.ids[key]) }

func newCheckFixture(t *testing.T) *checkFixture {
	t.Helper()
	ctx := context.Background()
	f := &checkFixture{root: t.TempDir(), pool: newFakePool("tp"), ids: map[string]uint32{}, commitIDs: map[string]uint32{}}
	s, err := newFake(t, f.root, f.pool)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []error{
		func() error { _, err := s.Prepare(ctx, "a", ""); return err }(),
		func() error { _, err := s.Prepare(ctx, "c-active", ""); return err }(),
		s.Commit(ctx, "c", "c-active"),
		func() error { _, err := s.Prepare(ctx, "b", "c"); return err }(),
		func() error { _, err := s.View(ctx, "v", "c"); return err }(),
	} {
		if step != nil {
			t.Fatal(step)
		}
	}
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		f.base = pi.BaseDeviceID
		if err != nil {
			return err
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			f.ids[sn.Key] = sn.DeviceID
			if sn.CommitID != 0 {
				f.commitIDs[sn.Key] = sn.CommitID
			}
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f.db, err = storage.Open(ctx, filepath.Join(f.root, dbFile), storage.WithNoSync())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.db.Close() })
	return f
}

func (f *checkFixture) update(t *testing.T, fn func(tx *storage.Tx) error) {
	t.Helper()
	if err := f.db.Update(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
}

// removeView removes view v's record: c's device, which v shared, is
// then needed by nothing.
func (f *checkFixture) removeView(t *testing.T) {
	t.Helper()
	f.update(t, func(tx *storage.Tx) error {
		_, err := tx.RemoveSnapshot("v")
		return err
	})
}

// allocate takes a fresh id in the database only.
func (f *checkFixture) allocate(t *testing.T) uint32 {
	t.Helper()
	var id uint32
	f.update(t, func(tx *storage.Tx) (err error) {
		id, err = tx.AllocateID()
		return err
	})
	return id
}

// setOwner rewrites the id table behind storage's back, as corruption or a
// bug would: id allocated to owner.
func (f *checkFixture) setOwner(t *testing.T, id uint32, owner string) {
	t.Helper()
	path := filepath.Join(f.root, dbFile)
	if err := f.db.Close(); err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = bdb.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("ids-used")).Put(binary.BigEndian.AppendUint32(nil, id), append([]byte{1}, owner...))
	})
	if cerr := bdb.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if f.db, err = storage.Open(context.Background(), path, storage.WithNoSync()); err != nil {
		t.Fatal(err)
	}
}

func (f *checkFixture) open(t *testing.T) *Snapshotter {
	t.Helper()
	s, err := openCheck(context.Background(), Config{Root: f.root, BaseSize: 64 << 20}, f.db, f.pool,
		func(context.Context, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// summary is "kind key id" per finding, for exact comparisons.
func summary(fs []Finding) []string {
	out := []string{}
	for _, f := range fs {
		out = append(out, fmt.Sprintf("%s %s %d", f.Kind, f.Key, f.DeviceID))
	}
	return out
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name string
		// breakIt damages the state behind the snapshotter's back and
		// returns the findings expected ("kind key id").
		breakIt func(t *testing.T, f *checkFixture) []string
		opts    CheckOptions
		// remaining after repair; nil means clean.
		remaining func(f *checkFixture) []string
	}{
		{
			name:    "clean",
			breakIt: func(t *testing.T, f *checkFixture) []string { return nil },
		},
		{
			name: "orphan not allocated",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.thins[99] = 0
				return []string{"orphan  99"}
			},
			remaining: func(f *checkFixture) []string { return []string{"foreign_id  99"} },
		},
		{
			name: "orphan allocated without record",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.extra = f.allocate(t)
				f.pool.thins[f.extra] = 0
				return []string{fmt.Sprintf("orphan  %d", f.extra)}
			},
			remaining: func(f *checkFixture) []string { return []string{fmt.Sprintf("foreign_id  %d", f.extra)} },
		},
		{
			name: "active orphan",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.thins[99] = 0
				f.pool.devices["tp-snap-99"] = &fakeDev{id: 99, sectors: 1}
				return []string{"orphan  99", "stale_device  99"}
			},
			remaining: func(f *checkFixture) []string { return []string{"foreign_id  99"} },
		},
		{
			name: "ghost reported, not repaired",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				delete(f.pool.devices, f.dev("a"))
				delete(f.pool.thins, f.ids["a"])
				return []string{fmt.Sprintf("ghost a %d", f.ids["a"])}
			},
			remaining: func(f *checkFixture) []string { return []string{fmt.Sprintf("ghost a %d", f.ids["a"])} },
		},
		{
			name: "ghost removed with RemoveGhosts",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				delete(f.pool.devices, f.dev("a"))
				delete(f.pool.thins, f.ids["a"])
				return []string{fmt.Sprintf("ghost a %d", f.ids["a"])}
			},
			opts: CheckOptions{RemoveGhosts: true},
		},
		{
			name: "ghost parent with children stays",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				delete(f.pool.thins, f.ids["c"])
				return []string{fmt.Sprintf("ghost c %d", f.ids["c"])}
			},
			opts:      CheckOptions{RemoveGhosts: true},
			remaining: func(f *checkFixture) []string { return []string{fmt.Sprintf("ghost c %d", f.ids["c"])} },
		},
		{
			name: "base missing",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				delete(f.pool.thins, f.base)
				return []string{fmt.Sprintf("base_missing  %d", f.base)}
			},
		},
		{
			name: "wrong thin id",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.devices[f.dev("a")].id = f.ids["c"]
				return []string{fmt.Sprintf("wrong_device a %d", f.ids["a"])}
			},
		},
		{
			name: "writable view",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				// v shares c's device.
				f.pool.devices[f.dev("c")].readOnly = false
				return []string{fmt.Sprintf("wrong_device v %d", f.ids["c"])}
			},
		},
		{
			name: "wrong and open",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.devices[f.dev("a")].sectors = 8
				f.pool.devices[f.dev("a")].open = 1
				return []string{fmt.Sprintf("wrong_device a %d", f.ids["a"])}
			},
			remaining: func(f *checkFixture) []string { return []string{fmt.Sprintf("wrong_device a %d", f.ids["a"])} },
		},
		{
			name: "committed device active",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.removeView(t)
				f.pool.devices[f.dev("c")] = &fakeDev{id: f.ids["c"], sectors: 1}
				return []string{fmt.Sprintf("stale_device  %d", f.ids["c"])}
			},
		},
		{
			name: "base active and junk name",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.devices[fmt.Sprintf("tp-snap-%d", f.base)] = &fakeDev{id: f.base, sectors: 1}
				f.pool.devices["tp-snap-x"] = &fakeDev{id: f.ids["c"], sectors: 1}
				// Not ours by name: ignored.
				f.pool.devices["other-snap-1"] = &fakeDev{id: f.ids["c"], sectors: 1}
				return []string{fmt.Sprintf("stale_device  %d", f.base), "stale_device  0"}
			},
		},
		{
			name: "stale and open",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.removeView(t)
				f.pool.devices[f.dev("c")] = &fakeDev{id: f.ids["c"], sectors: 1, open: 2}
				return []string{fmt.Sprintf("stale_device  %d", f.ids["c"])}
			},
			remaining: func(f *checkFixture) []string { return []string{fmt.Sprintf("stale_device  %d", f.ids["c"])} },
		},
		{
			name: "missing devices after a reboot",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				clear(f.pool.devices)
				return []string{fmt.Sprintf("missing_device a %d", f.ids["a"]), fmt.Sprintf("missing_device b %d", f.ids["b"]),
					fmt.Sprintf("missing_device v %d", f.ids["c"])}
			},
		},
		{
			name: "interrupted remove",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.update(t, func(tx *storage.Tx) error {
					b, err := tx.RemoveSnapshot("b")
					if err != nil {
						return err
					}
					_, err = removalEntries(tx, b)
					return err
				})
				return []string{fmt.Sprintf("pending_journal b %d", f.ids["b"])}
			},
		},
		{
			name: "interrupted create after the pool moved",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				var id uint32
				f.update(t, func(tx *storage.Tx) (err error) {
					if id, err = tx.AllocateID(); err != nil {
						return err
					}
					if _, err := tx.CreateSnapshot(storage.Snapshot{Key: "n", Kind: snapshots.KindActive, State: storage.StateCreating, DeviceID: id, Size: 64 << 20, FSType: "ext4"}); err != nil {
						return err
					}
					_, err = tx.AddJournal(storage.Entry{Op: storage.OpCreateSnap, DeviceID: id, OriginID: f.base, Key: "n"})
					return err
				})
				f.pool.thins[id] = 0
				f.pool.txid++
				return []string{"txid_mismatch  0", fmt.Sprintf("pending_journal n %d", id)}
			},
		},
		{
			name: "record left creating",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.update(t, func(tx *storage.Tx) error {
					_, err := tx.SetState("b", storage.StateCreating)
					return err
				})
				return []string{fmt.Sprintf("not_ready b %d", f.ids["b"])}
			},
		},
		{
			name: "leaked id",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				return []string{fmt.Sprintf("leaked_id  %d", f.allocate(t))}
			},
		},
		{
			name: "id conflicts need a person",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.setOwner(t, f.ids["a"], "zzz")
				f.setOwner(t, 99, "gone")
				f.pool.thins[99] = 0
				return []string{fmt.Sprintf("id_conflict a %d", f.ids["a"]), "id_conflict gone 99"}
			},
			remaining: func(f *checkFixture) []string {
				return []string{fmt.Sprintf("id_conflict a %d", f.ids["a"]), "id_conflict gone 99"}
			},
		},
		{
			name: "someone else's pool: nothing repaired",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.txid += 5
				f.pool.thins[99] = 0
				return []string{"txid_mismatch  0", "orphan  99"}
			},
			remaining: func(f *checkFixture) []string { return []string{"txid_mismatch  0", "orphan  99"} },
		},
		{
			name: "pool needs check: nothing repaired",
			breakIt: func(t *testing.T, f *checkFixture) []string {
				f.pool.status.NeedsCheck = true
				f.extra = f.allocate(t)
				return []string{"pool_unhealthy  0", fmt.Sprintf("leaked_id  %d", f.extra)}
			},
			remaining: func(f *checkFixture) []string {
				return []string{"pool_unhealthy  0", fmt.Sprintf("leaked_id  %d", f.extra)}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			f := newCheckFixture(t)
			want := tc.breakIt(t, f)
			if want == nil {
				want = []string{}
			}
			s := f.open(t)
			f.pool.ops = nil

			r, err := s.Check(ctx, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(r.Findings); !slices.Equal(got, want) {
				t.Fatalf("findings:\n got %q\nwant %q\n%+v", got, want, r.Findings)
			}
			if r.Clean != (len(want) == 0) || !slices.Equal(summary(r.Remaining), want) {
				t.Errorf("check without repair: clean %v, remaining %q", r.Clean, summary(r.Remaining))
			}
			for _, fd := range r.Findings {
				if fd.Repaired || fd.Action != "" || fd.Message == "" {
					t.Errorf("check without repair reports %+v", fd)
				}
			}
			for _, op := range f.pool.ops {
				if op != "status" {
					t.Errorf("check without repair ran pool operations %v", f.pool.ops)
					break
				}
			}

			opts := tc.opts
			opts.Repair = true
			r, err = s.Check(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			wantLeft := []string{}
			if tc.remaining != nil {
				wantLeft = tc.remaining(f)
			}
			if got := summary(r.Remaining); !slices.Equal(got, wantLeft) || r.Clean != (len(wantLeft) == 0) {
				t.Fatalf("after repair: clean %v, remaining %q, want %q\nfindings %+v", r.Clean, got, wantLeft, r.Findings)
			}
			if !slices.Equal(summary(r.Findings), want) {
				t.Errorf("repair report findings %q, want %q", summary(r.Findings), want)
			}
			for _, fd := range r.Findings {
				left := slices.Contains(wantLeft, fmt.Sprintf("%s %s %d", fd.Kind, fd.Key, fd.DeviceID))
				if fd.Repaired == left {
					t.Errorf("finding %+v: repaired %v, expected to remain %v", fd, fd.Repaired, left)
				}
				if fd.Repaired && fd.Action == "" {
					t.Errorf("repaired finding without action: %+v", fd)
				}
			}

			r, err = s.Check(ctx, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(r.Findings); !slices.Equal(got, wantLeft) {
				t.Errorf("check after repair: %q, want %q", got, wantLeft)
			}
			if len(wantLeft) == 0 {
				checkConsistent(t, s, f.pool)
				// The daemon starts on the repaired state.
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				s2 := mustNew(t, f.root, f.pool)
				checkConsistent(t, s2, f.pool)
			}
		})
	}
}

func TestCheckRepairNeedsStoppedDaemon(t *testing.T) {
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	if _, err := s.Check(context.Background(), CheckOptions{Repair: true}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("repair on a serving snapshotter: %v", err)
	}
	r, err := s.Check(context.Background(), CheckOptions{})
	if err != nil || !r.Clean || r.Pool != "tp" || len(r.PoolDevices) != 1 || r.BaseDeviceID != r.PoolDevices[0] {
		t.Fatalf("read-only check of a serving snapshotter: %+v, %v", r, err)
	}
}

func TestIDOfName(t *testing.T) {
	s := &Snapshotter{pool: newFakePool("tp")}
	for name, want := range map[string]uint32{"tp-snap-7": 7, "tp-snap-07": 0, "tp-snap-0": 0, "tp-snap-x": 0, "tp-snap-16777216": 0, "tp-snap-16777215": 16777215} {
		got, ok := s.idOfName(name)
		if got != want || ok != (want != 0) {
			t.Errorf("%s: %d %v, want %d", name, got, ok, want)
		}
	}
	if !strings.HasPrefix(s.deviceName(1), "tp-snap-") {
		t.Fatal(s.deviceName(1))
	}
}

// TestCheckReadsMetadataOutsidePoolLock: thin_ls reads the metadata
// snapshot (seconds on a large pool) while snapshot calls go on, and the
// snapshot is released after.
func TestCheckReadsMetadataOutsidePoolLock(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "a", "")
	pool.mu.Lock()
	pool.onThinIDs = func() {
		// A View makes a snapshot of c under poolMu.
		done := make(chan error, 1)
		go func() {
			_, err := s.View(ctx, "v", "c")
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("View while check reads the metadata: %v", err)
			}
		case <-time.After(time.Minute):
			t.Error("View waited for check's metadata read")
		}
	}
	pool.mu.Unlock()
	r, err := s.CheckOnline(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean {
		t.Errorf("check with a View made during its metadata read: %+v", r.Findings)
	}
	pool.mu.Lock()
	defer pool.mu.Unlock()
	if pool.metaSnap {
		t.Error("metadata snapshot still reserved after check")
	}
}
