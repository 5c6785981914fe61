package snapshotter

import "context"

// CheckOnline is Check without repair on a serving snapshotter. Each pass
// takes the pool's metadata snapshot and reads the database with no pool
// step running (gather holds poolMu for that, not while thin_ls reads the
// snapshot), but creates, commits and removals between
// their steps still look like pending entries, and dm devices change
// outside poolMu. So it checks twice and reports only the findings seen
// the same both times: what an operation in flight causes passes.
func (s *Snapshotter) CheckOnline(ctx context.Context) (*Report, error) {
	first, err := s.Check(ctx, CheckOptions{})
	if err != nil {
		return nil, err
	}
	if first.Clean {
		first.Online = true
		return first, nil
	}
	second, err := s.Check(ctx, CheckOptions{})
	if err != nil {
		return nil, err
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
	return second, nil
}
