package storage

import (
	"bytes"
	"fmt"
	"maps"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/filters"
	"github.com/containerd/errdefs"
)

// MaxKeyLen bounds snapshot keys and names; bbolt keys are limited to 32 KiB
// and the children index stores a parent and a child key together.
const MaxKeyLen = 4096

// State is the lifecycle state of a snapshot record, used by the snapshotter
// to keep records whose pool work has not finished away from clients.
type State uint8

const (
	// StateCreating means the record and its device id are reserved and
	// the pool work (thin create / snapshot, mkfs) is not known to have
	// finished.
	StateCreating State = 1
	// StateReady records are visible through Stat, Walk and UpdateInfo,
	// usable as parents, and an active one can be committed.
	StateReady State = 2
	// StateRemoving means removal has started; hidden like StateCreating.
	StateRemoving State = 3
)

func (s State) valid() bool { return s >= StateCreating && s <= StateRemoving }

func (s State) String() string {
	switch s {
	case StateCreating:
		return "creating"
	case StateReady:
		return "ready"
	case StateRemoving:
		return "removing"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Snapshot is the stored record of one snapshot.
type Snapshot struct {
	Key     string
	Kind    snapshots.Kind // KindView, KindActive or KindCommitted
	Parent  string         // key of a committed snapshot, or ""
	Labels  map[string]string
	Created time.Time
	Updated time.Time
	State   State

	// DeviceID is the thin device id, 0 for a snapshot without its own
	// device. A non-zero id must have been allocated (AllocateID or
	// ReserveID) and is owned by at most one record.
	DeviceID uint32
	Size     uint64          // virtual size of the device in bytes
	FSType   string          // filesystem on the device
	Usage    snapshots.Usage // recorded by CommitActive
	// Shared is what the device had mapped when it was made, all of it
	// shared with its origin: the snapshotter subtracts it so a layer's
	// usage excludes its parents'. Units are the snapshotter's.
	Shared uint64
	// CommitID, for an active snapshot, is an id reserved for the device
	// of its commit, owned by the record like DeviceID: a commit then
	// needs no journal entry of its own, as a device on it can only come
	// from an earlier commit of this snapshot that did not finish. 0 when
	// none is reserved.
	CommitID uint32
}

// Info converts the record to containerd's snapshot info.
func (s *Snapshot) Info() snapshots.Info {
	return snapshots.Info{
		Kind:    s.Kind,
		Name:    s.Key,
		Parent:  s.Parent,
		Labels:  maps.Clone(s.Labels),
		Created: s.Created,
		Updated: s.Updated,
	}
}

func checkKey(what, key string) error {
	if key == "" {
		return fmt.Errorf("%s must not be empty: %w", what, errdefs.ErrInvalidArgument)
	}
	if len(key) > MaxKeyLen {
		return fmt.Errorf("%s is %d bytes, longer than %d: %w", what, len(key), MaxKeyLen, errdefs.ErrInvalidArgument)
	}
	return nil
}

// get returns the record for key; found is false when it does not exist.
func (tx *Tx) get(key string) (s Snapshot, found bool, err error) {
	v := tx.snapshots.Get([]byte(key))
	if v == nil {
		return Snapshot{}, false, nil
	}
	s, err = decodeSnapshot(key, v)
	return s, err == nil, err
}

func (tx *Tx) put(s *Snapshot) error {
	if err := tx.snapshots.Put([]byte(s.Key), encodeSnapshot(s)); err != nil {
		return fmt.Errorf("write snapshot %q: %w", s.Key, err)
	}
	return nil
}

func (tx *Tx) mustGet(key string) (Snapshot, error) {
	s, found, err := tx.get(key)
	if err != nil {
		return Snapshot{}, err
	}
	if !found {
		return Snapshot{}, fmt.Errorf("snapshot %q: %w", key, errdefs.ErrNotFound)
	}
	return s, nil
}

// getReady is the view clients get: records not in StateReady do not exist.
func (tx *Tx) getReady(key string) (Snapshot, error) {
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	if s.State != StateReady {
		return Snapshot{}, fmt.Errorf("snapshot %q is %s: %w", key, s.State, errdefs.ErrNotFound)
	}
	return s, nil
}

// committedParent checks that parent can have children.
func (tx *Tx) committedParent(parent string, notCommitted error) error {
	p, err := tx.mustGet(parent)
	if err != nil {
		return fmt.Errorf("parent: %w", err)
	}
	if p.Kind != snapshots.KindCommitted {
		return fmt.Errorf("parent %q is not a committed snapshot: %w", parent, notCommitted)
	}
	if p.State != StateReady {
		return fmt.Errorf("parent %q is %s: %w", parent, p.State, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// CreateSnapshot stores a new record and returns it as stored (Created and
// Updated default to now). A committed record made this way (a layer
// shared from another snapshot's device) must start in StateCreating.
// Errors: InvalidArgument for a bad kind, key, state or device id, or a
// parent that is not committed;
// NotFound for a missing parent; FailedPrecondition for a parent that is not
// ready or a device id that is not allocated or already owned;
// AlreadyExists for a taken key.
func (tx *Tx) CreateSnapshot(s Snapshot) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	switch {
	case s.Kind == snapshots.KindActive || s.Kind == snapshots.KindView:
	case s.Kind == snapshots.KindCommitted && s.State == StateCreating:
	default:
		return Snapshot{}, fmt.Errorf("snapshot kind %v in state %v invalid, only active or view (or committed while creating) can be created: %w", s.Kind, s.State, errdefs.ErrInvalidArgument)
	}
	if err := checkKey("snapshot key", s.Key); err != nil {
		return Snapshot{}, err
	}
	if !s.State.valid() {
		return Snapshot{}, fmt.Errorf("snapshot %q: invalid state %d: %w", s.Key, s.State, errdefs.ErrInvalidArgument)
	}
	if s.DeviceID > MaxDeviceID {
		return Snapshot{}, fmt.Errorf("snapshot %q: device id %d out of range: %w", s.Key, s.DeviceID, errdefs.ErrInvalidArgument)
	}
	if s.Parent != "" {
		if err := tx.committedParent(s.Parent, errdefs.ErrInvalidArgument); err != nil {
			return Snapshot{}, fmt.Errorf("snapshot %q: %w", s.Key, err)
		}
	}
	if tx.snapshots.Get([]byte(s.Key)) != nil {
		return Snapshot{}, fmt.Errorf("snapshot %q: %w", s.Key, errdefs.ErrAlreadyExists)
	}
	if s.CommitID != 0 && (s.Kind != snapshots.KindActive || s.CommitID > MaxDeviceID || s.CommitID == s.DeviceID) {
		return Snapshot{}, fmt.Errorf("snapshot %q: commit id %d for a %v snapshot with device %d: %w", s.Key, s.CommitID, s.Kind, s.DeviceID, errdefs.ErrInvalidArgument)
	}
	for _, id := range []uint32{s.DeviceID, s.CommitID} {
		if id == 0 {
			continue
		}
		if err := tx.claimID(id, s.Key); err != nil {
			return Snapshot{}, fmt.Errorf("snapshot %q: %w", s.Key, err)
		}
	}
	now := tx.now().UTC()
	if s.Created.IsZero() {
		s.Created = now
	}
	if s.Updated.IsZero() {
		s.Updated = s.Created
	}
	s.Labels = maps.Clone(s.Labels)
	if err := tx.put(&s); err != nil {
		return Snapshot{}, err
	}
	if s.Parent != "" {
		if err := tx.children.Put(childKey(s.Parent, s.Key), nil); err != nil {
			return Snapshot{}, fmt.Errorf("write parent link of %q: %w", s.Key, err)
		}
	}
	return s, nil
}

// GetSnapshot returns the record for key in any state, or NotFound.
func (tx *Tx) GetSnapshot(key string) (Snapshot, error) {
	return tx.mustGet(key)
}

// Stat returns the info of a ready snapshot; records in other states are
// NotFound.
func (tx *Tx) Stat(key string) (snapshots.Info, error) {
	s, err := tx.getReady(key)
	if err != nil {
		return snapshots.Info{}, err
	}
	return s.Info(), nil
}

// UpdateInfo changes the labels of a ready snapshot with containerd's
// semantics: no fieldpaths replaces all labels, "labels" likewise,
// "labels.<k>" sets one label to info.Labels[k] (the empty string if absent);
// any other fieldpath is InvalidArgument. Kind and parent never change;
// Updated becomes now.
func (tx *Tx) UpdateInfo(info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	if err := tx.checkWritable(); err != nil {
		return snapshots.Info{}, err
	}
	s, err := tx.getReady(info.Name)
	if err != nil {
		return snapshots.Info{}, err
	}
	if len(fieldpaths) == 0 {
		s.Labels = maps.Clone(info.Labels)
	}
	for _, path := range fieldpaths {
		if k, ok := strings.CutPrefix(path, "labels."); ok {
			// A label missing from info is deleted, as containerd's
			// snapshotter testsuite expects.
			if v, ok := info.Labels[k]; ok {
				if s.Labels == nil {
					s.Labels = map[string]string{}
				}
				s.Labels[k] = v
			} else {
				delete(s.Labels, k)
			}
			continue
		}
		if path != "labels" {
			return snapshots.Info{}, fmt.Errorf("cannot update %q field on snapshot %q: %w", path, info.Name, errdefs.ErrInvalidArgument)
		}
		s.Labels = maps.Clone(info.Labels)
	}
	if len(s.Labels) == 0 {
		s.Labels = nil
	}
	s.Updated = tx.now().UTC()
	if err := tx.put(&s); err != nil {
		return snapshots.Info{}, err
	}
	return s.Info(), nil
}

// WalkKeys calls fn for every ready snapshot whose key rename accepts and
// that matches any of the filters (containerd filter syntax over name,
// kind, parent and labels.<k>), in key order. fn sees the names rename
// returns for keys and parents: a key space within the database, such as a
// size class, with its prefix cut off. A filter syntax error is
// InvalidArgument. fn must not start another transaction.
func (tx *Tx) WalkKeys(rename func(key string) (string, bool), fn func(snapshots.Info) error, fs ...string) error {
	filter, err := filters.ParseAll(fs...)
	if err != nil {
		return err
	}
	c := tx.snapshots.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		s, err := decodeSnapshot(string(k), v)
		if err != nil {
			return err
		}
		if s.State != StateReady {
			continue
		}
		name, ok := rename(s.Key)
		if !ok {
			continue
		}
		parent := s.Parent
		if parent != "" {
			parent, _ = rename(parent)
		}
		// s was just decoded and is not shared, so its labels need no copy.
		info := snapshots.Info{Kind: s.Kind, Name: name, Parent: parent, Labels: s.Labels, Created: s.Created, Updated: s.Updated}
		if !filter.Match(adaptInfo(&info)) {
			continue
		}
		if err := fn(info); err != nil {
			return err
		}
	}
	return nil
}

// WalkSnapshots calls fn for every record in any state, in key order; it is
// meant for recovery and garbage collection.
func (tx *Tx) WalkSnapshots(fn func(Snapshot) error) error {
	c := tx.snapshots.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		s, err := decodeSnapshot(string(k), v)
		if err != nil {
			return err
		}
		if err := fn(s); err != nil {
			return err
		}
	}
	return nil
}

func adaptInfo(info *snapshots.Info) filters.Adaptor {
	return filters.AdapterFunc(func(fieldpath []string) (string, bool) {
		if len(fieldpath) == 0 {
			return "", false
		}
		switch fieldpath[0] {
		case "name":
			return info.Name, true
		case "parent":
			return info.Parent, true
		case "kind":
			switch info.Kind {
			case snapshots.KindView:
				return "view", true
			case snapshots.KindActive:
				return "active", true
			case snapshots.KindCommitted:
				return "committed", true
			}
		case "labels":
			v, ok := info.Labels[strings.Join(fieldpath[1:], ".")]
			return v, ok
		}
		return "", false
	})
}

// CommitActive turns the ready active snapshot key into the committed
// snapshot name on device id (the active's CommitID, or an allocated,
// unowned id), keeping its size and fs type. The active's own id (and a
// CommitID it did not use) stay allocated without an owner, for the caller
// to reuse or release. Labels come from opts only (not inherited);
// a parentless active may be given a parent by snapshots.WithParent.
// Created and Updated become now. The key no longer exists afterwards.
// Errors follow containerd: AlreadyExists if name is taken, NotFound if key
// (or a new parent) is missing, FailedPrecondition if key is not an active
// ready snapshot, the parent is not committed or id is not free,
// InvalidArgument for changing an existing parent or a bad id.
func (tx *Tx) CommitActive(key, name string, id uint32, usage snapshots.Usage, opts ...snapshots.Opt) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	if err := checkID(id); err != nil {
		return Snapshot{}, err
	}
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return Snapshot{}, err
		}
	}
	s, err := tx.committable(key, name, base.Parent)
	if err != nil {
		return Snapshot{}, err
	}
	if err := tx.unlink(key, s.Parent); err != nil {
		return Snapshot{}, err
	}
	if base.Parent != "" {
		s.Parent = base.Parent
	}
	s.Key, s.Kind = name, snapshots.KindCommitted
	s.Labels = maps.Clone(base.Labels)
	if len(s.Labels) == 0 {
		s.Labels = nil
	}
	s.Created = tx.now().UTC()
	s.Updated = s.Created
	s.Usage = usage
	if id == s.CommitID {
		// The active's reservation passes to the committed snapshot.
		if err := tx.used.Put(idKey(id), ownerValue(name)); err != nil {
			return Snapshot{}, fmt.Errorf("move device id %d to %q: %w", id, name, err)
		}
	} else if err := tx.claimID(id, name); err != nil {
		// Claimed first: the active's own id is owned and refused.
		return Snapshot{}, fmt.Errorf("committed snapshot %q: %w", name, err)
	}
	for _, old := range []uint32{s.DeviceID, s.CommitID} {
		if old != 0 && old != id {
			if err := tx.used.Put(idKey(old), ownerValue("")); err != nil {
				return Snapshot{}, fmt.Errorf("disown device id %d: %w", old, err)
			}
		}
	}
	s.DeviceID, s.CommitID = id, 0
	if err := tx.put(&s); err != nil {
		return Snapshot{}, err
	}
	if s.Parent != "" {
		if err := tx.children.Put(childKey(s.Parent, name), nil); err != nil {
			return Snapshot{}, fmt.Errorf("write parent link of %q: %w", name, err)
		}
	}
	return s, nil
}

// committable returns the record of active key if it can be committed as
// name with parent newParent ("" keeps its own).
func (tx *Tx) committable(key, name, newParent string) (Snapshot, error) {
	if err := checkKey("committed name", name); err != nil {
		return Snapshot{}, err
	}
	if tx.snapshots.Get([]byte(name)) != nil {
		return Snapshot{}, fmt.Errorf("committed snapshot %q: %w", name, errdefs.ErrAlreadyExists)
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	if s.Kind != snapshots.KindActive {
		return Snapshot{}, fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
	}
	if s.State != StateReady {
		return Snapshot{}, fmt.Errorf("snapshot %q is %s: %w", key, s.State, errdefs.ErrFailedPrecondition)
	}
	parent := s.Parent
	if newParent != "" && newParent != s.Parent {
		if s.Parent != "" {
			return Snapshot{}, fmt.Errorf("cannot change parent of active snapshot %q on commit: %w", key, errdefs.ErrInvalidArgument)
		}
		parent = newParent
	}
	if parent != "" {
		if err := tx.committedParent(parent, errdefs.ErrFailedPrecondition); err != nil {
			return Snapshot{}, fmt.Errorf("commit %q: %w", key, err)
		}
	}
	return s, nil
}

// unlink deletes the record of key and its link from parent.
func (tx *Tx) unlink(key, parent string) error {
	if err := tx.snapshots.Delete([]byte(key)); err != nil {
		return fmt.Errorf("delete snapshot %q: %w", key, err)
	}
	if parent != "" {
		if err := tx.children.Delete(childKey(parent, key)); err != nil {
			return fmt.Errorf("delete parent link of %q: %w", key, err)
		}
	}
	return nil
}

// RemoveSnapshot deletes the record for key in any state and returns it.
// Its device id (and its CommitID) stay allocated, now without owner, until
// ReleaseID, which the snapshotter calls once the pool confirmed the device
// is deleted.
// NotFound if missing, FailedPrecondition if it has children.
func (tx *Tx) RemoveSnapshot(key string) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	if tx.hasChildren(key) {
		return Snapshot{}, fmt.Errorf("cannot remove snapshot %q with children: %w", key, errdefs.ErrFailedPrecondition)
	}
	if err := tx.unlink(key, s.Parent); err != nil {
		return Snapshot{}, err
	}
	for _, id := range []uint32{s.DeviceID, s.CommitID} {
		if id == 0 {
			continue
		}
		if owner, ok := tx.idOwner(id); ok && owner == key {
			if err := tx.used.Put(idKey(id), ownerValue("")); err != nil {
				return Snapshot{}, fmt.Errorf("disown device id %d: %w", id, err)
			}
		}
	}
	return s, nil
}

// SetSize records a new virtual size of the device of key.
func (tx *Tx) SetSize(key string, size uint64) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	s.Size = size
	return s, tx.put(&s)
}

// SetShared records what the device of key shared with its origin when it
// was made (see Snapshot.Shared).
func (tx *Tx) SetShared(key string, shared uint64) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	s.Shared = shared
	return s, tx.put(&s)
}

// SetCommitID reserves id (allocated, unowned) for the commit of active
// snapshot key (see Snapshot.CommitID), which must have none yet.
func (tx *Tx) SetCommitID(key string, id uint32) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	if err := checkID(id); err != nil {
		return Snapshot{}, err
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	if s.Kind != snapshots.KindActive || s.CommitID != 0 {
		return Snapshot{}, fmt.Errorf("snapshot %q is %v with commit id %d: %w", key, s.Kind, s.CommitID, errdefs.ErrFailedPrecondition)
	}
	if err := tx.claimID(id, key); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %q: %w", key, err)
	}
	s.CommitID = id
	return s, tx.put(&s)
}

// ClearCommitID takes the reserved commit id off active snapshot key and
// returns it; it stays allocated without an owner.
func (tx *Tx) ClearCommitID(key string) (uint32, error) {
	if err := tx.checkWritable(); err != nil {
		return 0, err
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return 0, err
	}
	id := s.CommitID
	if id == 0 {
		return 0, nil
	}
	if owner, ok := tx.idOwner(id); ok && owner == key {
		if err := tx.used.Put(idKey(id), ownerValue("")); err != nil {
			return 0, fmt.Errorf("disown device id %d: %w", id, err)
		}
	}
	s.CommitID = 0
	return id, tx.put(&s)
}

// SetState changes the lifecycle state of the record for key and returns
// the updated record. Updated is left alone: state is not client-visible.
func (tx *Tx) SetState(key string, state State) (Snapshot, error) {
	if err := tx.checkWritable(); err != nil {
		return Snapshot{}, err
	}
	if !state.valid() {
		return Snapshot{}, fmt.Errorf("invalid state %d: %w", state, errdefs.ErrInvalidArgument)
	}
	s, err := tx.mustGet(key)
	if err != nil {
		return Snapshot{}, err
	}
	if s.State == state {
		return s, nil
	}
	s.State = state
	return s, tx.put(&s)
}

func (tx *Tx) hasChildren(key string) bool {
	prefix := childPrefix(key)
	k, _ := tx.children.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix)
}

// OnlyCommittedChild returns parent's committed child, in any state, when
// parent has exactly one; ok is false otherwise.
func (tx *Tx) OnlyCommittedChild(parent string) (child Snapshot, ok bool, err error) {
	prefix := childPrefix(parent)
	c := tx.children.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		s, err := tx.mustGet(string(k[len(prefix):]))
		if err != nil {
			return Snapshot{}, false, err
		}
		if s.Kind != snapshots.KindCommitted {
			continue
		}
		if ok {
			return Snapshot{}, false, nil
		}
		child, ok = s, true
	}
	return child, ok, nil
}

// SharedViews counts the views of parent, in any state, that have no
// device of their own (DeviceID 0): they share parent's device.
func (tx *Tx) SharedViews(parent string) (int, error) {
	prefix := childPrefix(parent)
	n := 0
	c := tx.children.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		s, err := tx.mustGet(string(k[len(prefix):]))
		if err != nil {
			return 0, err
		}
		if s.Kind == snapshots.KindView && s.DeviceID == 0 {
			n++
		}
	}
	return n, nil
}
