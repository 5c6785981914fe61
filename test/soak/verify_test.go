package soak

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// resolve settles every operation that got no answer: after the restart it
// must have happened entirely or not at all, never halfway.
func (m *model) resolve(ctx context.Context, sn snapshots.Snapshotter) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	stat := func(key string) (snapshots.Info, bool, error) {
		info, err := sn.Stat(ctx, key)
		if errdefs.IsNotFound(err) {
			return info, false, nil
		}
		return info, err == nil, err
	}
	for _, p := range m.pending {
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf("unacked %s of %q (client error %w): %s", p.op, p.key, p.err, fmt.Sprintf(format, args...)))
		}
		switch p.op {
		case opPrepare, opView:
			kind := snapshots.KindActive
			if p.op == opView {
				kind = snapshots.KindView
			}
			info, ok, err := stat(p.key)
			if err != nil {
				bad("stat: %v", err)
				continue
			}
			if !ok {
				m.resolved[p.op.String()+": not applied"]++
				continue
			}
			if info.Kind != kind || info.Parent != p.parent {
				bad("exists as %s of %q, want %s of %q", info.Kind, info.Parent, kind, p.parent)
				continue
			}
			if _, ok := m.snaps[p.parent]; p.parent != "" && !ok {
				bad("exists but its parent %q was removed (acked)", p.parent)
			}
			m.resolved[p.op.String()+": applied"]++
			m.snaps[p.key] = &snapRec{kind: kind, parent: p.parent, markers: p.markers, owner: p.owner}
		case opCommit:
			nInfo, nOK, nErr := stat(p.name)
			kInfo, kOK, kErr := stat(p.key)
			if err := errors.Join(nErr, kErr); err != nil {
				bad("stat: %v", err)
				continue
			}
			rec := m.snaps[p.key]
			switch {
			case nOK && !kOK:
				if nInfo.Kind != snapshots.KindCommitted || nInfo.Parent != p.parent {
					bad("committed %q is %s of %q, want committed of %q", p.name, nInfo.Kind, nInfo.Parent, p.parent)
				}
				m.resolved["commit: applied"]++
				delete(m.snaps, p.key)
				m.removed[p.key] = true
				m.snaps[p.name] = &snapRec{kind: snapshots.KindCommitted, parent: p.parent, markers: p.markers, owner: p.owner}
			case !nOK && kOK:
				if kInfo.Kind != snapshots.KindActive || kInfo.Parent != p.parent {
					bad("left as %s of %q, want active of %q", kInfo.Kind, kInfo.Parent, p.parent)
				}
				m.resolved["commit: not applied"]++
				rec.doubt = false
			default:
				bad("half done: committed %q exists=%v, active %q exists=%v", p.name, nOK, p.key, kOK)
				rec.doubt = false
			}
		case opRemove:
			info, ok, err := stat(p.key)
			if err != nil {
				bad("stat: %v", err)
				continue
			}
			rec := m.snaps[p.key]
			if !ok {
				m.resolved["remove: applied"]++
				delete(m.snaps, p.key)
				m.removed[p.key] = true
				continue
			}
			if info.Kind != rec.kind || info.Parent != rec.parent {
				bad("still there as %s of %q, want %s of %q", info.Kind, info.Parent, rec.kind, rec.parent)
			}
			m.resolved["remove: not applied"]++
			rec.doubt = false
		}
	}
	m.pending = nil
	return errors.Join(errs...)
}

// verifyStructure compares the daemon's Walk with the model: the same keys,
// kinds and parents; nothing acked as removed is back.
func (m *model) verifyStructure(ctx context.Context, sn snapshots.Snapshotter) error {
	got := map[string]snapshots.Info{}
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		got[info.Name] = info
		return nil
	}); err != nil {
		return fmt.Errorf("walk: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for k, r := range m.snaps {
		if r.busy || r.doubt {
			errs = append(errs, fmt.Errorf("model: %q still busy=%v doubt=%v", k, r.busy, r.doubt))
		}
		info, ok := got[k]
		if !ok {
			errs = append(errs, fmt.Errorf("acked %s %q (parent %q) is gone", r.kind, k, r.parent))
			continue
		}
		if info.Kind != r.kind || info.Parent != r.parent {
			errs = append(errs, fmt.Errorf("%q is %s of %q, want %s of %q", k, info.Kind, info.Parent, r.kind, r.parent))
		}
	}
	for k, info := range got {
		if _, ok := m.snaps[k]; ok {
			continue
		}
		if m.removed[k] {
			errs = append(errs, fmt.Errorf("%q was removed (acked) but is back as %s", k, info.Kind))
		} else {
			errs = append(errs, fmt.Errorf("unknown snapshot %q (%s of %q)", k, info.Kind, info.Parent))
		}
	}
	return errors.Join(errs...)
}

// verifyContent mounts every snapshot the model knows (a committed one
// through a temporary view) and checks its marker files; it returns how
// many were mounted.
func (m *model) verifyContent(ctx context.Context, sn snapshots.Snapshotter, mntBase, tag string) (int, error) {
	m.mu.Lock()
	type item struct {
		key     string
		kind    snapshots.Kind
		markers []string
	}
	var items []item
	for k, r := range m.snaps {
		items = append(items, item{k, r.kind, r.markers})
	}
	m.mu.Unlock()
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })

	var errs []error
	n := 0
	for _, it := range items {
		var err error
		if it.kind == snapshots.KindCommitted {
			vkey := "check-" + tag + "-" + it.key
			mounts, verr := sn.View(ctx, vkey, it.key)
			if verr != nil {
				errs = append(errs, fmt.Errorf("view of committed %q: %w", it.key, verr))
				continue
			}
			err = withMount(mntBase, mounts, func(dir string) error { return verifyMarkers(dir, it.markers) })
			if rerr := sn.Remove(ctx, vkey); rerr != nil {
				err = errors.Join(err, fmt.Errorf("remove check view: %w", rerr))
			}
		} else {
			mounts, merr := sn.Mounts(ctx, it.key)
			if merr != nil {
				errs = append(errs, fmt.Errorf("mounts of %s %q: %w", it.kind, it.key, merr))
				continue
			}
			err = withMount(mntBase, mounts, func(dir string) error { return verifyMarkers(dir, it.markers) })
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("content of %s %q: %w", it.kind, it.key, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// devicesToActivate is how many dm devices a reboot takes that recovery
// must bring back: one per active snapshot, one per layer with views (they
// share its device) and one per view of no layer (its own).
func (m *model) devicesToActivate() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	layers := map[string]bool{}
	for _, r := range m.snaps {
		switch {
		case r.kind == snapshots.KindActive:
			n++
		case r.kind == snapshots.KindView && r.parent == "":
			n++
		case r.kind == snapshots.KindView:
			layers[r.parent] = true
		}
	}
	return n + len(layers)
}

func (m *model) counts() map[snapshots.Kind]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := map[snapshots.Kind]int{}
	for _, r := range m.snaps {
		c[r.kind]++
	}
	return c
}
