package snapshotter

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// ContainerSnapshot is the snapshot containerd prepared as the root
// filesystem of a container.
type ContainerSnapshot struct {
	// Key is the snapshot's key in the database: containerd's key, behind
	// the prefix of its size class if it has one.
	Key string
	// Class is the size class of the snapshot, "" for the main socket.
	Class string
	// Size is the virtual size of its device in bytes.
	Size uint64
}

// FindContainer returns the active snapshot that containerd prepared as the
// root filesystem of container id in namespace ns, on the main socket or a
// size class's. containerd's metadata store hands its snapshotters keys of
// the form "<namespace>/<sequence number>/<key>", and the key of a
// container's root filesystem is the container's id. NotFound when no such
// snapshot is ready: the container is on another snapshotter, or gone.
func (s *Snapshotter) FindContainer(ctx context.Context, ns, id string) (ContainerSnapshot, error) {
	if ns == "" || id == "" || strings.Contains(ns, "/") || strings.Contains(id, "/") {
		return ContainerSnapshot{}, fmt.Errorf("container %q in namespace %q: %w", id, ns, errdefs.ErrInvalidArgument)
	}
	var found []ContainerSnapshot
	err := s.db.View(ctx, func(tx *storage.Tx) error {
		return tx.WalkSnapshots(func(snap storage.Snapshot) error {
			if snap.Kind != snapshots.KindActive || snap.State != storage.StateReady {
				return nil
			}
			space := keySpace(snap.Key)
			if !isContainerKey(snap.Key[len(space):], ns, id) {
				return nil
			}
			class := strings.TrimSuffix(strings.TrimPrefix(space, classMark), "/")
			found = append(found, ContainerSnapshot{Key: snap.Key, Class: class, Size: snap.Size})
			return nil
		})
	})
	switch {
	case err != nil:
		return ContainerSnapshot{}, err
	case len(found) == 0:
		return ContainerSnapshot{}, fmt.Errorf("no active snapshot of container %s in namespace %s: %w", id, ns, errdefs.ErrNotFound)
	case len(found) > 1:
		return ContainerSnapshot{}, fmt.Errorf("container %s in namespace %s has %d active snapshots (%v): %w",
			id, ns, len(found), found, errdefs.ErrFailedPrecondition)
	}
	return found[0], nil
}

// isContainerKey reports whether key, without a class prefix, is
// containerd's key of the snapshot named id in namespace ns.
func isContainerKey(key, ns, id string) bool {
	rest, ok := strings.CutPrefix(key, ns+"/")
	if !ok {
		return false
	}
	seq, name, ok := strings.Cut(rest, "/")
	if !ok || name != id {
		return false
	}
	_, err := strconv.ParseUint(seq, 10, 64)
	return err == nil
}

// GrowContainer grows the active snapshot key (see FindContainer), device
// and filesystem, to size bytes rounded down to whole filesystem blocks,
// and returns the size it has afterwards. A size below what it has (its
// class's size, base_size, or an earlier grow) leaves it as it is: a
// requested size only grows a snapshot. The grow is Update's with the
// max-size label, which records the size, does nothing when the label
// asked for it already and grows the filesystem again after a grow that
// failed halfway. Mounts of key waits for it.
func (s *Snapshotter) GrowContainer(ctx context.Context, key string, size uint64) (uint64, error) {
	unlock := s.keys.lock(key)
	defer unlock()
	snap, err := s.ready(ctx, key)
	if err != nil {
		return 0, err
	}
	if snap.Kind != snapshots.KindActive {
		return 0, fmt.Errorf("snapshot %q is %s, not active: %w", key, snap.Kind, errdefs.ErrFailedPrecondition)
	}
	want := blockAligned(size)
	if want < snap.Size {
		return snap.Size, nil
	}
	info := snapshots.Info{Name: key, Labels: map[string]string{snapshots.LabelSnapshotMaxSize: strconv.FormatUint(want, 10)}}
	if _, err := s.update(ctx, info, "labels."+snapshots.LabelSnapshotMaxSize); err != nil {
		return 0, err
	}
	return want, nil
}
