package snapshotter

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// The self-check: a goroutine of the snapshotter runs the online check
// every CheckInterval, and once after a startup recovery that did
// something, then repairs what is safe to repair while calls go on
// (repairOnline). Findings that need a person stay, for Status, the
// metrics and the log. It belongs to the snapshotter rather than the
// daemon because its repairs take the snapshotter's own locks (poolMu,
// the removals in flight, the database's writer lock) and must end before
// the database closes, which stopBackground already sees to.

// checkTimeout bounds one self-check: thin_ls reads the pool's whole
// metadata, seconds on a large pool.
const checkTimeout = 30 * time.Minute

// What started a self-check (CheckRun.Trigger).
const (
	// CheckAfterRecovery: the startup recovery did something.
	CheckAfterRecovery = "recovery"
	// CheckPeriodic: CheckInterval passed.
	CheckPeriodic = "interval"
)

// offlineOnly is the action of a repairable finding the self-check leaves.
const offlineOnly = "not repaired online: stop the daemon and run thin-snapshotter check --repair"

// CheckRun is what the last self-check found and did.
type CheckRun struct {
	// Trigger is what started it; "" before the first.
	Trigger string
	// Ended is when it ended; zero before the first.
	Ended    time.Time
	Duration time.Duration
	// Error says why it could not check; "" when it did.
	Error string
	// Findings are those seen in both passes of the online check, with
	// what the online repair did about each.
	Findings []Finding
}

// Counts are the findings by kind: left for a person (or for check
// --repair with the daemon stopped), and repaired online.
func (c CheckRun) Counts() (left, repaired map[FindingKind]int) {
	left, repaired = map[FindingKind]int{}, map[FindingKind]int{}
	for _, f := range c.Findings {
		if f.Repaired {
			repaired[f.Kind]++
		} else {
			left[f.Kind]++
		}
	}
	return left, repaired
}

// watchConsistency is the self-check goroutine: a check after a recovery
// that did something, then one CheckInterval after the end of each.
func (s *Snapshotter) watchConsistency(ctx context.Context, afterRecovery bool) {
	if afterRecovery {
		s.selfCheck(ctx, CheckAfterRecovery)
	}
	t := time.NewTimer(s.cfg.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.selfCheck(ctx, CheckPeriodic)
			t.Reset(s.cfg.CheckInterval)
		}
	}
}

// recoveryActed says whether the startup recovery did something.
func (s *Snapshotter) recoveryActed() bool {
	s.admin.mu.Lock()
	defer s.admin.mu.Unlock()
	r := s.admin.recovery
	r.Duration = 0
	return r != Recovery{}
}

// selfCheck runs one check and its online repairs, logs the outcome and
// keeps it for Status. A check the snapshotter's stop cut short is
// neither: it says nothing about the state.
func (s *Snapshotter) selfCheck(ctx context.Context, trigger string) CheckRun {
	cctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	start := time.Now()
	fs, err := s.checkAndRepair(cctx)
	if ctx.Err() != nil {
		return CheckRun{}
	}
	run := CheckRun{Trigger: trigger, Ended: time.Now(), Findings: fs}
	run.Duration = run.Ended.Sub(start)
	if err != nil {
		run.Error = err.Error()
	}
	logCheck(ctx, run)
	s.admin.mu.Lock()
	s.admin.check = run
	s.admin.mu.Unlock()
	return run
}

// lastCheck is a copy of the last self-check.
func (s *Snapshotter) lastCheck() CheckRun {
	s.admin.mu.Lock()
	defer s.admin.mu.Unlock()
	c := s.admin.check
	c.Findings = slices.Clone(c.Findings)
	return c
}

// checkAndRepair checks online, drops the entries that settled meanwhile
// and repairs what is safe; it returns the findings with what was done.
func (s *Snapshotter) checkAndRepair(ctx context.Context) ([]Finding, error) {
	s.checkMu.Lock()
	defer s.checkMu.Unlock()
	r, st, err := s.checkTwice(ctx)
	if err != nil {
		return nil, err
	}
	fs, err := s.dropSettled(ctx, r.Findings)
	if err != nil {
		return nil, err
	}
	s.repairOnline(ctx, st, fs)
	return fs, nil
}

// dropSettled leaves out the pending entries that have left the journal
// after a pause between calls: operations that were in flight through both
// passes (a filesystem grow, a removal the worker was finishing), not
// problems.
func (s *Snapshotter) dropSettled(ctx context.Context, fs []Finding) ([]Finding, error) {
	if !slices.ContainsFunc(fs, func(f Finding) bool { return f.Kind == FindingPendingJournal }) {
		return fs, nil
	}
	s.bg.calls.pause(ctx, time.Now().Add(maxDefer))
	left := map[uint64]bool{}
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		entries, err := tx.Journal()
		for _, e := range entries {
			left[e.Seq] = true
		}
		return err
	}); err != nil {
		return nil, err
	}
	return slices.DeleteFunc(fs, func(f Finding) bool { return f.Kind == FindingPendingJournal && !left[f.seq] }), nil
}

// repairOnline repairs, in place, the findings of an online check that
// are safe to repair while calls go on:
//   - pending removals are finished, each in a pause between calls as the
//     worker does (a removal the worker has in hand is left to it);
//   - leaked ids are released once a fresh read of the database finds
//     them leaked still (leakedOnline).
//
// Nothing is repaired when the pool may not be this database's or is
// unhealthy (repairRefusal). The other repairable findings are left for
// check --repair, with the daemon stopped; the rest need a person.
func (s *Snapshotter) repairOnline(ctx context.Context, st *checkState, fs []Finding) {
	if why := s.repairRefusal(st, fs); why != "" {
		refuse(fs, why)
		return
	}
	r := repairs{s: s, fs: fs}
	r.pendingRemovals(ctx, st)
	r.leakedOnline(ctx, st)
	for i := range fs {
		if fs[i].Repairable && fs[i].Action == "" {
			fs[i].Action = offlineOnly
		}
	}
}

// pendingRemovals finishes the removals among the pending entries. An
// interrupted create or commit is left: only recovery tells one from a
// call still running.
func (r *repairs) pendingRemovals(ctx context.Context, st *checkState) {
	entries := map[uint64]storage.Entry{}
	for _, e := range st.journal {
		entries[e.Seq] = e
	}
	for _, f := range r.of(FindingPendingJournal) {
		e, ok := entries[f.seq]
		if !ok || e.Op != storage.OpDelete {
			continue
		}
		r.s.bg.calls.pause(ctx, time.Now().Add(maxDefer))
		if ctx.Err() != nil {
			return
		}
		// Once begun, finished even when the snapshotter stops.
		err := r.s.finishDelete(context.WithoutCancel(ctx), e)
		done(f, fmt.Sprintf("finished the removal of thin device %d", e.DeviceID), err)
	}
}

// leakedOnline releases the leaked ids that are leaked still when the
// database is read again and compared, in the transaction that releases
// them, with the pool's ids of the check. That is enough: an id enters the
// pool only by a create journaled first and leaves it only by a journaled
// removal, so a create racing for the id shows in the fresh read and the
// id stays.
func (r *repairs) leakedOnline(ctx context.Context, st *checkState) {
	leaked := r.of(FindingLeakedID)
	if len(leaked) == 0 || ctx.Err() != nil {
		return
	}
	still := map[uint32]bool{}
	err := r.s.db.Update(context.WithoutCancel(ctx), func(tx *storage.Tx) error {
		clear(still) // the transaction may run again
		fresh := newCheckState()
		fresh.status, fresh.poolTx, fresh.inPool = st.status, st.poolTx, st.inPool
		if err := fresh.readDB(tx); err != nil {
			return err
		}
		for _, f := range r.s.compare(fresh) {
			if f.Kind == FindingLeakedID {
				still[f.DeviceID] = true
			}
		}
		for _, f := range leaked {
			if still[f.DeviceID] {
				if err := tx.ReleaseID(f.DeviceID); err != nil {
					return err
				}
			}
		}
		return nil
	})
	for _, f := range leaked {
		if err == nil && !still[f.DeviceID] {
			done(f, fmt.Sprintf("left id %d alone: no longer leaked", f.DeviceID), nil)
			continue
		}
		done(f, fmt.Sprintf("released id %d", f.DeviceID), err)
	}
}

// logCheck logs what a self-check found and did: a repair at info, a
// finding left or a check that could not run as a warning.
func logCheck(ctx context.Context, run CheckRun) {
	l := log.G(ctx).WithField("trigger", run.Trigger).WithField("duration", run.Duration)
	if run.Error != "" {
		l.WithField("error", run.Error).Warn("self-check could not check")
		return
	}
	left := 0
	for _, f := range run.Findings {
		fl := l.WithField("kind", string(f.Kind)).WithField("id", f.DeviceID).WithField("key", f.Key)
		switch {
		case f.Repaired:
			fl.Infof("self-check repaired: %s (%s)", f.Action, f.Message)
		case f.Error != "":
			left++
			fl.WithField("error", f.Error).Warnf("self-check could not repair: %s", f.Message)
		default:
			left++
			fl.Warnf("self-check: %s", f.Message)
		}
	}
	if left > 0 {
		l.Warnf("self-check left %d of %d findings (thin-snapshotter status lists them)", left, len(run.Findings))
		return
	}
	l.Info("self-check: consistent")
}
