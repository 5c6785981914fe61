package soak

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc/status"
)

// snapRec is what the client knows for sure about one snapshot.
type snapRec struct {
	kind   snapshots.Kind
	parent string
	// markers are the keys of the active snapshots whose marker files the
	// filesystem holds: the parent's plus, once written, the own one.
	markers []string
	owner   int
	// busy: a worker is using it (writing its marker, committing or
	// removing it); no other operation picks it meanwhile.
	busy bool
	// doubt: an operation on it got no answer; resolved after the restart.
	doubt bool
}

type opKind int

const (
	opPrepare opKind = iota
	opView
	opCommit
	opRemove
)

func (k opKind) String() string {
	return [...]string{"prepare", "view", "commit", "remove"}[k]
}

// pendingOp is an operation that failed without a definite answer (most
// often because the daemon died under it): after the restart it must have
// happened entirely or not at all.
type pendingOp struct {
	op      opKind
	key     string // the snapshot created, committed or removed
	name    string // commit target
	parent  string
	markers []string
	owner   int
	err     error
}

// model is the client-side truth: acknowledged operations only.
type model struct {
	mu      sync.Mutex
	snaps   map[string]*snapRec
	removed map[string]bool
	pending []pendingOp
	seq     int

	// counters for the report
	acked    map[opKind]int
	unacked  map[opKind]int
	resolved map[string]int
	errKinds map[string]int
	odd      []string // unacked errors other than the daemon's death
}

func newModel() *model {
	return &model{
		snaps:    map[string]*snapRec{},
		removed:  map[string]bool{},
		acked:    map[opKind]int{},
		unacked:  map[opKind]int{},
		resolved: map[string]int{},
		errKinds: map[string]int{},
	}
}

func (m *model) newKey(prefix string, worker, round int) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seq++
	return fmt.Sprintf("%s-w%d-r%d-%d", prefix, worker, round, m.seq)
}

func (m *model) addPending(p pendingOp) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.addPendingLocked(p)
}

func (m *model) addPendingLocked(p pendingOp) {
	m.unacked[p.op]++
	k := errKind(p.err)
	m.errKinds[k]++
	if k != "Unavailable" && k != "Canceled" && len(m.odd) < 50 {
		m.odd = append(m.odd, fmt.Sprintf("%s %q: %v", p.op, p.key, p.err))
	}
	m.pending = append(m.pending, p)
}

// errKind names the gRPC status of a failed call: Unavailable is the
// daemon's death; anything else is worth a look.
func errKind(err error) string {
	switch {
	case errdefs.IsUnavailable(err):
		return "Unavailable"
	case errdefs.IsCanceled(err):
		return "Canceled"
	case errdefs.IsNotFound(err):
		return "NotFound"
	case errdefs.IsFailedPrecondition(err):
		return "FailedPrecondition"
	case errdefs.IsAlreadyExists(err):
		return "AlreadyExists"
	}
	if st, ok := status.FromError(err); ok && err != nil {
		return st.Code().String()
	}
	return "other"
}

// markerContent is the deterministic content of key's marker file: the key
// then 4-12 KiB derived from it, so a reader needs nothing but the key.
func markerContent(key string) []byte {
	sum := sha256.Sum256([]byte(key))
	n := 4096 + int(sum[0])*32
	out := append([]byte(key), '\n')
	for len(out) < n {
		sum = sha256.Sum256(sum[:])
		out = append(out, sum[:]...)
	}
	return out[:n]
}

const markerDir = "soak-markers"

// withMount mounts mounts on a fresh directory under base, runs fn on it
// and always unmounts: a mount left behind would hold the device open.
func withMount(base string, mounts []mount.Mount, fn func(dir string) error) (err error) {
	dir, err := os.MkdirTemp(base, "mnt")
	if err != nil {
		return err
	}
	if err := mount.All(mounts, dir); err != nil {
		os.Remove(dir)
		return fmt.Errorf("mount %v: %w", mounts, err)
	}
	defer func() {
		if uerr := mount.UnmountAll(dir, 0); uerr != nil {
			err = errors.Join(err, fmt.Errorf("unmount %s: %w", dir, uerr))
			return
		}
		err = errors.Join(err, os.Remove(dir))
	}()
	return fn(dir)
}

func writeMarker(dir, key string) error {
	md := filepath.Join(dir, markerDir)
	if err := os.MkdirAll(md, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(md, key))
	if err != nil {
		return err
	}
	if _, err := f.Write(markerContent(key)); err != nil {
		f.Close()
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}

// verifyMarkers checks the filesystem holds exactly the marker files of
// want, each with its content.
func verifyMarkers(dir string, want []string) error {
	ents, err := os.ReadDir(filepath.Join(dir, markerDir))
	if err != nil && !(errors.Is(err, os.ErrNotExist) && len(want) == 0) {
		return err
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	sort.Strings(got)
	w := slices.Clone(want)
	sort.Strings(w)
	if !slices.Equal(got, w) {
		return fmt.Errorf("marker files %v, want %v", got, w)
	}
	for _, k := range w {
		b, err := os.ReadFile(filepath.Join(dir, markerDir, k))
		if err != nil {
			return err
		}
		if string(b) != string(markerContent(k)) {
			return fmt.Errorf("marker %s: %d bytes with wrong content (first line %q)", k, len(b), strings.SplitN(string(b), "\n", 2)[0])
		}
	}
	return nil
}

// worker runs operations until ctx ends (the daemon was killed). Local
// work (mount, write, unmount) always completes, so the client knows
// exactly what it wrote; only daemon calls are cut off.
type worker struct {
	id      int
	round   int
	m       *model
	sn      snapshots.Snapshotter
	rng     *rand.Rand
	mntBase string
	cap     int
	// fatal collects failures that are not the daemon's death: local
	// mount/write errors and wrong content seen during the workload.
	fatal func(error)
	// stop is set just before the kill: no operation starts after it, so
	// every unanswered one was in flight when the daemon died.
	stop *atomic.Bool
	ops  int
}

func (w *worker) run(ctx context.Context) {
	for ctx.Err() == nil && !w.stop.Load() {
		w.step(ctx)
		w.ops++
	}
}

func (w *worker) step(ctx context.Context) {
	m := w.m
	m.mu.Lock()
	var own, ownActive, ownLeaves, committed []string
	children := map[string]bool{}
	for _, r := range m.snaps {
		children[r.parent] = true
	}
	for _, p := range m.pending {
		children[p.parent] = true
	}
	for k, r := range m.snaps {
		if r.kind == snapshots.KindCommitted && !r.doubt {
			committed = append(committed, k)
		}
		if r.owner != w.id || r.busy || r.doubt {
			continue
		}
		own = append(own, k)
		if r.kind == snapshots.KindActive && slices.Contains(r.markers, k) {
			ownActive = append(ownActive, k)
		}
		if !children[k] {
			ownLeaves = append(ownLeaves, k)
		}
	}
	m.mu.Unlock()
	// Map order is random: sort so the rng alone decides.
	sort.Strings(committed)
	sort.Strings(ownActive)
	sort.Strings(ownLeaves)

	r := w.rng.IntN(100)
	switch {
	case len(own) >= w.cap && len(ownLeaves) > 0 && r < 60:
		w.remove(ctx, ownLeaves[w.rng.IntN(len(ownLeaves))])
	case r < 30:
		parent := ""
		if len(committed) > 0 && w.rng.IntN(3) > 0 {
			parent = committed[w.rng.IntN(len(committed))]
		}
		w.prepare(ctx, parent)
	case r < 55 && len(ownActive) > 0:
		w.commit(ctx, ownActive[w.rng.IntN(len(ownActive))])
	case r < 65 && len(committed) > 0:
		w.view(ctx, committed[w.rng.IntN(len(committed))])
	case r < 85 && len(ownLeaves) > 0:
		w.remove(ctx, ownLeaves[w.rng.IntN(len(ownLeaves))])
	default:
		w.read(ctx, committed)
	}
}

func (w *worker) parentMarkers(parent string) ([]string, bool) {
	if parent == "" {
		return nil, true
	}
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	p, ok := w.m.snaps[parent]
	if !ok {
		return nil, false
	}
	return slices.Clone(p.markers), true
}

func (w *worker) prepare(ctx context.Context, parent string) {
	pm, ok := w.parentMarkers(parent)
	if !ok {
		return // removed meanwhile
	}
	key := w.m.newKey("a", w.id, w.round)
	mounts, err := w.sn.Prepare(ctx, key, parent)
	if err != nil {
		w.m.addPending(pendingOp{op: opPrepare, key: key, parent: parent, markers: pm, owner: w.id, err: err})
		w.pause(ctx)
		return
	}
	m := w.m
	m.mu.Lock()
	m.acked[opPrepare]++
	rec := &snapRec{kind: snapshots.KindActive, parent: parent, markers: pm, owner: w.id, busy: true}
	m.snaps[key] = rec
	m.mu.Unlock()

	// Not cancelled by the kill: the kernel device outlives the daemon.
	err = withMount(w.mntBase, mounts, func(dir string) error {
		if err := verifyMarkers(dir, pm); err != nil {
			return fmt.Errorf("new active %q of %q: %w", key, parent, err)
		}
		return writeMarker(dir, key)
	})
	m.mu.Lock()
	rec.busy = false
	if err == nil {
		rec.markers = append(rec.markers, key)
	}
	m.mu.Unlock()
	if err != nil {
		w.fatal(fmt.Errorf("worker %d: %w", w.id, err))
	}
}

func (w *worker) commit(ctx context.Context, key string) {
	m := w.m
	m.mu.Lock()
	rec := m.snaps[key]
	rec.busy = true
	m.mu.Unlock()
	name := "c" + strings.TrimPrefix(key, "a")
	err := w.sn.Commit(ctx, name, key)
	m.mu.Lock()
	defer m.mu.Unlock()
	rec.busy = false
	if err != nil {
		rec.doubt = true
		m.addPendingLocked(pendingOp{op: opCommit, key: key, name: name, parent: rec.parent, markers: rec.markers, owner: w.id, err: err})
		return
	}
	m.acked[opCommit]++
	delete(m.snaps, key)
	m.removed[key] = true
	m.snaps[name] = &snapRec{kind: snapshots.KindCommitted, parent: rec.parent, markers: rec.markers, owner: w.id}
}

func (w *worker) view(ctx context.Context, parent string) {
	pm, ok := w.parentMarkers(parent)
	if !ok {
		return
	}
	key := w.m.newKey("v", w.id, w.round)
	mounts, err := w.sn.View(ctx, key, parent)
	if err != nil {
		w.m.addPending(pendingOp{op: opView, key: key, parent: parent, markers: pm, owner: w.id, err: err})
		w.pause(ctx)
		return
	}
	m := w.m
	m.mu.Lock()
	m.acked[opView]++
	rec := &snapRec{kind: snapshots.KindView, parent: parent, markers: pm, owner: w.id, busy: true}
	m.snaps[key] = rec
	m.mu.Unlock()
	err = withMount(w.mntBase, mounts, func(dir string) error { return verifyMarkers(dir, pm) })
	m.mu.Lock()
	rec.busy = false
	m.mu.Unlock()
	if err != nil {
		w.fatal(fmt.Errorf("worker %d: view %q of %q: %w", w.id, key, parent, err))
	}
}

func (w *worker) remove(ctx context.Context, key string) {
	m := w.m
	m.mu.Lock()
	rec := m.snaps[key]
	rec.busy = true
	m.mu.Unlock()
	err := w.sn.Remove(ctx, key)
	m.mu.Lock()
	defer m.mu.Unlock()
	rec.busy = false
	if err != nil {
		if errdefs.IsFailedPrecondition(err) && ctx.Err() == nil {
			// Another worker made a child of it meanwhile: a
			// definite refusal, nothing changed.
			return
		}
		rec.doubt = true
		m.addPendingLocked(pendingOp{op: opRemove, key: key, parent: rec.parent, markers: rec.markers, owner: w.id, err: err})
		return
	}
	m.acked[opRemove]++
	delete(m.snaps, key)
	m.removed[key] = true
}

// read exercises the read-only calls; their answers are not part of the
// model (other workers change things meanwhile), only their success.
func (w *worker) read(ctx context.Context, committed []string) {
	_ = w.sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil })
	if len(committed) > 0 {
		k := committed[w.rng.IntN(len(committed))]
		_, _ = w.sn.Stat(ctx, k)
		_, _ = w.sn.Usage(ctx, k)
	}
}

// pause avoids spinning on a dead socket between the kill and the cancel.
func (w *worker) pause(ctx context.Context) {
	select {
	case <-ctx.Done():
	case <-time.After(20 * time.Millisecond):
	}
}
