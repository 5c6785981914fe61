package snapshotter

import "context"

// CheckOnline is Check without repair on a serving snapshotter. Each pass
// takes the pool's metadata snapshot and reads the database with no pool
// step running (gather holds poolMu for that, not while thin_ls reads the
// snapshot), but creates, commits and removals between
// their steps still look like pending entries, and dm devices change
// outside poolMu. So it checks twice and reports only the findings seen
// the same both times: what an operation in flight causes passes.
//
// One check runs at a time (checkMu): the pool has room for one metadata
// snapshot, and the self-check (selfcheck.go) may be running.
func (s *Snapshotter) CheckOnline(ctx context.Context) (*Report, error) {
	s.checkMu.Lock()
	defer s.checkMu.Unlock()
	r, _, err := s.checkTwice(ctx)
	return r, err
}

// checkTwice is CheckOnline under checkMu. It also returns the state of
// the pass whose report it returns.
func (s *Snapshotter) checkTwice(ctx context.Context) (*Report, *checkState, error) {
	first, st, err := s.checkOnce(ctx)
	if err != nil {
		return nil, nil, err
	}
	if first.Clean {
		first.Online = true
		return first, st, nil
	}
	second, st, err := s.checkOnce(ctx)
	if err != nil {
		return nil, nil, err
	}
	seen := map[Finding]bool{}
	for _, f := range first.Findings {
		seen[f] = true
	}
	kept := []Finding{}
	for _, f := range second.Findings {
		if seen[f] {
			kept = append(kept, f)
		}
	}
	second.Online = true
	second.Findings, second.Remaining = kept, kept
	second.Clean = len(kept) == 0
	return second, st, nil
}
