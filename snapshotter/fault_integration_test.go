//go:build linux

package snapshotter

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

// faultCase is one fault in a pool's storage: fault on the pool's
// metadata or data device, and what the pool does about it.
type faultCase struct {
	name  string
	meta  bool // the fault is on the metadata device, else the data device
	fault dmtest.Fault
	// mode is the pool's mode in Status while the fault lasts.
	mode string
	// readable: a mounted snapshot still reads what it had.
	readable bool
	// repair runs the documented thin_repair step although thin_check
	// passed, so that every documented command runs in some case.
	repair bool
}

// TestIntegrationPoolFaults puts the pool's metadata and data devices on dm
// devices whose tables it swaps for flakey or error targets in the middle
// of a workload (a loop of Prepare, Commit and Remove), with a snapshot
// mounted as a running container's. While the fault lasts, every call
// returns within a bound; on a pool that takes no changes, Prepare, View,
// Commit and Remove fail with FailedPrecondition naming the pool and its
// mode, and Status shows the mode; the mounted snapshot reads what the
// kernel gives it. Then the fault clears and the
// operator's steps of docs/operations.md run as written (the shell blocks
// are run from the file): daemon stopped, the pool taken down, thin_check,
// the pool set up again, check (and repair), daemon started. Afterwards
// check is clean and every snapshot a call acknowledged is there with its
// content; what the pool refused can be done again.
func TestIntegrationPoolFaults(t *testing.T) {
	dmtest.RequireTarget(t, "flakey")
	for _, tc := range []faultCase{
		// A failed write of data blocks fails the flush before the next
		// metadata commit: the pool goes read-only, needs_check on disk.
		{name: "data-write-errors", fault: dmtest.FaultWriteErrors, mode: ModeNeedsCheck, readable: true},
		// The commit fails; the kernel rolls back to the last one.
		{name: "metadata-write-errors", meta: true, fault: dmtest.FaultWriteErrors, mode: ModeNeedsCheck, readable: true},
		// Not even the rollback can read the metadata.
		{name: "metadata-dead", meta: true, fault: dmtest.FaultDead, mode: ModeFail, repair: true},
		// No flush reaches an error target: the pool stays rw and
		// only the containers see their I/O fail.
		{name: "data-dead", fault: dmtest.FaultDead, mode: ModeRW},
	} {
		t.Run(tc.name, func(t *testing.T) { testPoolFault(t, tc) })
	}
}

// callBound is how long any call may take while the pool is faulty; the
// VM bench is slow, a hang (a queued write, a suspend that never ends) is
// not.
const callBound = 30 * time.Second

// within runs fn and waits for it at most callBound; hung says it did not
// return in time (it goes on running).
func within[T any](fn func() (T, error)) (v T, took time.Duration, hung bool, err error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		v, err := fn()
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, time.Since(start), false, r.err
	case <-time.After(callBound):
		return v, callBound, true, nil
	}
}

// bounded runs fn and fails the test when it takes longer than callBound.
func bounded[T any](t *testing.T, what string, fn func() (T, error)) (T, error) {
	t.Helper()
	v, took, hung, err := within(fn)
	if hung {
		t.Fatalf("%s hangs: no answer after %v", what, callBound)
	}
	t.Logf("%s: %v after %v", what, err, took.Round(time.Millisecond))
	return v, err
}

func bounded0(t *testing.T, what string, fn func() error) error {
	t.Helper()
	_, err := bounded(t, what, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}

// faultRig is one snapshotter on a FaultPool and the content each
// acknowledged snapshot holds (file f).
type faultRig struct {
	t    *testing.T
	cfg  Config
	fp   *dmtest.FaultPool
	s    *Snapshotter
	mnt  string
	want map[string]string // key → content of f; "" for none
	gone []string          // keys whose removal was acknowledged
}

func testPoolFault(t *testing.T, tc faultCase) {
	ctx := t.Context()
	dir := t.TempDir()
	name := fmt.Sprintf("thin-fault-%d-%s", os.Getpid(), tc.name)
	r := &faultRig{t: t, mnt: t.TempDir(), want: map[string]string{}}
	r.fp = dmtest.NewFaultPool(t, dir, name, 8<<20, 256<<20, 128)
	r.cfg = testConfig(filepath.Join(dir, "root"))
	r.cfg.PoolName = name
	s, err := New(ctx, r.cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.s = s
	t.Cleanup(func() { r.s.Close() })

	// The workload before the fault: a layer, an active snapshot to
	// commit, a container (mounted, stays so), one to remove, a view.
	r.write("l1-active", "", "l1")
	r.must(s.Commit(ctx, "l1", "l1-active"))
	delete(r.want, "l1-active")
	r.ack("l1", "l1")
	r.write("build", "l1", "build")
	r.write("victim", "l1", "victim")
	if _, err := s.View(ctx, "v1", "l1"); err != nil {
		t.Fatal(err)
	}
	r.ack("v1", "l1")
	ctr := r.container("ctr", "l1")
	defer unix.Unmount(ctr, unix.MNT_DETACH)

	// The fault strikes in the middle of a stream of calls.
	var faulted atomic.Bool
	stop, churned := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(churned)
		r.churn(ctx, tc, &faulted, stop)
	}()
	stopChurn := sync.OnceFunc(func() {
		close(stop)
		<-churned
	})
	defer stopChurn()
	time.Sleep(time.Second)
	dev := r.fp.Data
	if tc.meta {
		dev = r.fp.Meta
	}
	faulted.Store(true)
	r.must(r.fp.SetFault(dev, tc.fault))
	time.Sleep(2 * time.Second)
	stopChurn()
	r.duringFault(ctx, tc, ctr)

	r.must(bounded0(t, "unmount the container", func() error { return unix.Unmount(ctr, 0) }))
	r.must(bounded0(t, "Close", r.s.Close))
	r.must(r.fp.SetFault(dev, dmtest.FaultNone))
	if tc.mode != ModeRW {
		r.operatorRepair(tc)
	}
	r.checkClean(true)
	r.afterRepair(ctx)
}

// duringFault makes the calls of the workload on the faulty pool, reads and
// writes the mounted container, and reads Status.
func (r *faultRig) duringFault(ctx context.Context, tc faultCase, ctr string) {
	t, s := r.t, r.s
	refused := tc.mode != ModeRW
	calls := []struct {
		what string
		fn   func() error
		ack  func()
	}{
		{"Commit l2 of build", func() error { return s.Commit(ctx, "l2", "build") }, func() {
			r.ack("l2", "build")
			delete(r.want, "build")
		}},
		{"Prepare new", func() error { _, err := s.Prepare(ctx, "new", "l1"); return err }, func() { r.ack("new", "l1") }},
		{"View v2", func() error { _, err := s.View(ctx, "v2", "l1"); return err }, func() { r.ack("v2", "l1") }},
		{"Remove victim", func() error { return s.Remove(ctx, "victim") }, func() {
			delete(r.want, "victim")
			r.gone = append(r.gone, "victim")
		}},
	}
	for _, c := range calls {
		err := bounded0(t, c.what, c.fn)
		switch {
		case err == nil:
			c.ack()
			if refused {
				t.Errorf("%s succeeded on a pool in mode %s", c.what, tc.mode)
			}
		case !refused:
			t.Errorf("%s on a pool in mode rw: %v", c.what, err)
		default:
			r.checkRefusal(c.what, err, tc.mode)
		}
	}

	// The running container keeps what the kernel gives it.
	got, err := bounded(t, "container reads its file", func() ([]byte, error) { return readUncached(filepath.Join(ctr, "f")) })
	if tc.readable && (err != nil || string(got) != "ctr") {
		t.Errorf("container read %q, %v; want %q", got, err, "ctr")
	}
	err = bounded0(t, "container writes and syncs", func() error {
		return writeSynced(filepath.Join(ctr, "during"), strings.Repeat("x", 1<<20))
	})
	if err == nil || !errors.Is(err, unix.EIO) && !errors.Is(err, unix.EROFS) {
		t.Errorf("container write on a faulty pool: %v, want EIO or EROFS", err)
	}

	st, err := bounded(t, "Status", func() (Status, error) { return s.Status(ctx) })
	if err != nil || st.Mode != tc.mode || st.NeedsCheck != (tc.mode == ModeNeedsCheck) {
		t.Errorf("Status: mode %q, needs_check %v (%v); want mode %q", st.Mode, st.NeedsCheck, err, tc.mode)
	}
}

// checkRefusal fails the test unless err is FailedPrecondition naming the
// pool and mode.
func (r *faultRig) checkRefusal(what string, err error, mode string) {
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "pool "+r.fp.Name) ||
		!strings.Contains(err.Error(), "mode "+mode) {
		r.t.Errorf("%s: %v; want FailedPrecondition naming pool %s and mode %s", what, err, r.fp.Name, mode)
	}
}

// churn makes layers in a loop until stop: Prepare on l1, Commit, Remove
// of the layer before. Every call must return within callBound; before
// the fault, and on a pool that stays rw, every call must succeed, after
// it one may only be refused. What a call acknowledged is recorded in
// r.want and r.gone once the loop ends.
func (r *faultRig) churn(ctx context.Context, tc faultCase, faulted *atomic.Bool, stop <-chan struct{}) {
	t := r.t
	acked, prev := map[string]bool{}, ""
	var (
		gone    []string
		refused bool
	)
	defer func() {
		for k := range acked {
			r.ack(k, "")
		}
		r.gone = append(r.gone, gone...)
		t.Logf("churn: %d snapshots acknowledged, %d removals", len(acked), len(gone))
	}()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		active, layer, old := fmt.Sprintf("churn-%d-active", i), fmt.Sprintf("churn-%d", i), prev
		steps := []struct {
			what string
			fn   func() error
			ok   func()
		}{
			{"Prepare " + active, func() error { _, err := r.s.Prepare(ctx, active, "l1"); return err }, func() { acked[active] = true }},
			{"Commit " + layer, func() error { return r.s.Commit(ctx, layer, active) }, func() {
				delete(acked, active)
				acked[layer], prev = true, layer
			}},
			{"Remove " + old, func() error {
				if old == "" {
					return nil
				}
				return r.s.Remove(ctx, old)
			}, func() {
				if old != "" {
					delete(acked, old)
					gone = append(gone, old)
				}
			}},
		}
		for _, st := range steps {
			_, _, hung, err := within(func() (struct{}, error) { return struct{}{}, st.fn() })
			if hung {
				t.Errorf("churn: %s hangs: no answer after %v", st.what, callBound)
				return
			}
			if err == nil {
				st.ok()
				continue
			}
			if !faulted.Load() || tc.mode == ModeRW {
				t.Errorf("churn: %s: %v", st.what, err)
			} else {
				r.checkRefusal("churn: "+st.what, err, tc.mode)
				if !refused {
					refused = true
					t.Logf("churn: %s, the first call the fault met: %v", st.what, err)
				}
			}
			time.Sleep(100 * time.Millisecond)
			break
		}
	}
}

// operatorRepair runs the steps docs/operations.md gives for a pool that
// failed or needs a check, the daemon stopped: its shell blocks as written,
// then check, and check --repair if check found anything.
func (r *faultRig) operatorRepair(tc faultCase) {
	t := r.t
	env := []string{"POOL=" + r.fp.Name, "META=" + r.fp.Meta.Path, "SPARE=" + r.fp.Spare}
	work := t.TempDir()
	blocks := docBlocks(t, "../docs/operations.md", "#### A pool made with dmsetup")
	if len(blocks) != 3 {
		t.Fatalf("docs/operations.md, A pool made with dmsetup: %d shell blocks, want 3 (take down and check, repair, set up)", len(blocks))
	}
	if err := runBlock(t, work, env, blocks[0]); err != nil || tc.repair {
		t.Logf("thin_check failed (%v) or the case repairs anyway (%v): the repair block", err, tc.repair)
		r.must(runBlock(t, work, env, blocks[1]))
	}
	r.must(runBlock(t, work, env, blocks[2]))
	r.checkClean(false)
}

// checkClean runs check on the stopped daemon's state: it must be clean,
// or clean after check --repair unless strict.
func (r *faultRig) checkClean(strict bool) {
	t := r.t
	ck, err := OpenForCheck(t.Context(), r.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	rep, err := ck.Check(t.Context(), CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check: %q", summary(rep.Findings))
	if rep.Clean {
		return
	}
	if strict {
		t.Fatalf("check after the daemon ran on the repaired pool: %+v", rep.Findings)
	}
	if rep, err = ck.Check(t.Context(), CheckOptions{Repair: true}); err != nil || !rep.Clean {
		t.Fatalf("check --repair: %v; remaining %+v", err, rep.Remaining)
	}
}

// afterRepair starts the daemon again and checks every acknowledged
// snapshot, then does what the pool refused.
func (r *faultRig) afterRepair(ctx context.Context) {
	t := r.t
	s, err := New(ctx, r.cfg)
	if err != nil {
		t.Fatalf("daemon start after the repair: %v", err)
	}
	r.s = s
	if st, err := s.Status(ctx); err != nil || st.Mode != ModeRW {
		t.Fatalf("Status after the repair: mode %q, %v", st.Mode, err)
	}
	for _, key := range sortedKeys(r.want) {
		r.readBack(ctx, key, r.want[key])
	}
	for _, key := range r.gone {
		if _, err := s.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Errorf("%s, removed, is back: %v", key, err)
		}
	}
	if _, ok := r.want["l2"]; !ok {
		r.must(s.Commit(ctx, "l2", "build"))
		r.ack("l2", "build")
		r.readBack(ctx, "l2", "build")
	}
	if _, ok := r.want["victim"]; ok {
		r.must(s.Remove(ctx, "victim"))
	}
	if _, ok := r.want["new"]; !ok {
		r.write("new", "l1", "new")
	}
	settle(t, s)
	r.must(s.Close())
	r.checkClean(true)
}

// readBack checks that snapshot key is there and reads want from file f
// (unless want is ""): an active snapshot or view through its own mounts, a
// committed one through a view.
func (r *faultRig) readBack(ctx context.Context, key, want string) {
	t := r.t
	info, err := r.s.Stat(ctx, key)
	if err != nil {
		t.Errorf("acknowledged snapshot %s is lost: %v", key, err)
		return
	}
	if want == "" {
		return // made without content
	}
	mountKey := key
	if info.Kind == snapshots.KindCommitted {
		mountKey = "check-" + key
		if _, err := r.s.View(ctx, mountKey, key); err != nil {
			t.Errorf("view of %s: %v", key, err)
			return
		}
		defer func() { r.must(r.s.Remove(ctx, mountKey)) }()
	}
	m, err := r.s.Mounts(ctx, mountKey)
	r.must(err)
	r.must(mount.All(m, r.mnt))
	got, err := os.ReadFile(filepath.Join(r.mnt, "f"))
	r.must(mount.UnmountAll(r.mnt, 0))
	if err != nil || string(got) != want {
		t.Errorf("%s reads %q, %v; want %q", key, got, err, want)
	}
}

func (r *faultRig) must(err error) {
	r.t.Helper()
	if err != nil {
		r.t.Fatal(err)
	}
}

func (r *faultRig) ack(key, content string) { r.want[key] = content }

// write prepares key on parent and writes content to its file f.
func (r *faultRig) write(key, parent, content string) {
	r.t.Helper()
	m, err := r.s.Prepare(r.t.Context(), key, parent)
	r.must(err)
	r.must(mount.All(m, r.mnt))
	err = writeSynced(filepath.Join(r.mnt, "f"), content)
	r.must(errors.Join(err, mount.UnmountAll(r.mnt, 0)))
	r.ack(key, content)
}

// container prepares key on parent, mounts it, writes its file f and
// returns the mount point, left mounted.
func (r *faultRig) container(key, parent string) string {
	r.t.Helper()
	m, err := r.s.Prepare(r.t.Context(), key, parent)
	r.must(err)
	dir := r.t.TempDir()
	r.must(mount.All(m, dir))
	r.must(writeSynced(filepath.Join(dir, "f"), key))
	unix.Sync() // nothing left for a later commit to carry
	r.ack(key, key)
	return dir
}

func writeSynced(path, content string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = f.WriteString(content)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// readUncached reads path from its device: its cached pages are dropped
// first.
func readUncached(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// docBlocks returns the ```sh blocks of the markdown file path that follow
// the line heading, up to the next heading.
func docBlocks(t *testing.T, path, heading string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		blocks      []string
		in, inBlock bool
		cur         strings.Builder
	)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == heading:
			in = true
		case !in:
		case inBlock && line == "```":
			blocks = append(blocks, cur.String())
			cur.Reset()
			inBlock = false
		case inBlock:
			cur.WriteString(line + "\n")
		case line == "```sh":
			inBlock = true
		case strings.HasPrefix(line, "#"):
			return blocks
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if !in {
		t.Fatalf("%s has no line %q", path, heading)
	}
	return blocks
}

// runBlock runs a shell block of the documentation as written, in dir, with
// its variables set in the environment (never spliced into the text).
func runBlock(t *testing.T, dir string, env []string, block string) error {
	t.Helper()
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", block)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := bounded(t, "documented step", func() ([]byte, error) { return cmd.CombinedOutput() })
	t.Logf("$ %s%s", strings.ReplaceAll(block, "\n", "\n$ "), out)
	if err != nil {
		return fmt.Errorf("documented step failed: %w\n%s", err, out)
	}
	return nil
}
