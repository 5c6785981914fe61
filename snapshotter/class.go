package snapshotter

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// classMark starts the stored key of every snapshot of a size class:
// "@<class>/<key>". containerd numbers keys per snapshotter, so two classes
// can send the same key; the prefix keeps them apart in the one database.
// Keys of the default key space (the Snapshotter itself) never start with
// it.
const classMark = "@"

// keySpace is the class prefix of a stored key, "" for the default space.
func keySpace(key string) string {
	if !strings.HasPrefix(key, classMark) {
		return ""
	}
	if i := strings.IndexByte(key, '/'); i >= 0 {
		return key[:i+1]
	}
	return key
}

// checkDefaultKey refuses a new key of the default space that would look
// like a class's.
func checkDefaultKey(key string) error {
	if strings.HasPrefix(key, classMark) {
		return fmt.Errorf("key %q: keys starting with %q are reserved for size classes: %w", key, classMark, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Class is a size class: a snapshotter on the same pool and database with
// keys of its own, whose active snapshots get the class's size unless they
// ask for one (label containerd.io/snapshot/max-size). Layers it would
// unpack are shared with the other classes (see shareLayer).
type Class struct {
	s      *Snapshotter
	name   string
	size   uint64
	prefix string
}

var _ snapshots.Snapshotter = (*Class)(nil)
var _ snapshots.Cleaner = (*Class)(nil)

// Class returns size class name of the configuration (Config.Classes).
func (s *Snapshotter) Class(name string) (*Class, error) {
	for _, c := range s.cfg.Classes {
		if c.Name == name {
			return &Class{s: s, name: name, size: c.Size, prefix: classMark + name + "/"}, nil
		}
	}
	return nil, fmt.Errorf("size class %q is not configured: %w", name, errdefs.ErrNotFound)
}

// Name is the class's name.
func (c *Class) Name() string { return c.name }

// Size is the class's default size of an active snapshot, in bytes.
func (c *Class) Size() uint64 { return c.size }

func (c *Class) key(k string) string {
	if k == "" {
		return ""
	}
	return c.prefix + k
}

// own maps a stored key back to the class's key; ok is false for keys of
// other spaces.
func (c *Class) own(k string) (string, bool) {
	return strings.CutPrefix(k, c.prefix)
}

func (c *Class) info(info snapshots.Info) snapshots.Info {
	info.Name, _ = c.own(info.Name)
	info.Parent, _ = c.own(info.Parent)
	return info
}

// Stat returns the info of a snapshot of the class.
func (c *Class) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	info, err := c.s.Stat(ctx, c.key(key))
	if err != nil {
		return info, err
	}
	return c.info(info), nil
}

// Update changes the labels of a snapshot of the class (see
// Snapshotter.Update).
func (c *Class) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	info.Name = c.key(info.Name)
	out, err := c.s.Update(ctx, info, fieldpaths...)
	if err != nil {
		return out, err
	}
	return c.info(out), nil
}

// Usage of a snapshot of the class.
func (c *Class) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return c.s.Usage(ctx, c.key(key))
}

// Mounts of a snapshot of the class.
func (c *Class) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return c.s.Mounts(ctx, c.key(key))
}

// Prepare creates an active snapshot of the class's size unless opts ask
// for a size, or it is a layer containerd unpacks (label
// containerd.io/snapshot.ref): layers keep their parent's size, so they
// stay shareable and cheap.
func (c *Class) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	opts = append(slices.Clip(opts), func(info *snapshots.Info) error {
		if _, ok := info.Labels[snapshots.LabelSnapshotMaxSize]; ok || info.Labels[snapshots.LabelSnapshotRef] != "" {
			return nil
		}
		info.Labels = maps.Clone(info.Labels)
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		info.Labels[snapshots.LabelSnapshotMaxSize] = strconv.FormatUint(c.size, 10)
		return nil
	})
	return c.s.create(ctx, snapshots.KindActive, c.key(key), c.key(parent), opts)
}

// View creates a read-only snapshot in the class.
func (c *Class) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return c.s.create(ctx, snapshots.KindView, c.key(key), c.key(parent), opts)
}

// Commit commits an active snapshot of the class.
func (c *Class) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	// A new parent given on commit is a key of the class too.
	opts = append(slices.Clip(opts), func(info *snapshots.Info) error {
		info.Parent = c.key(info.Parent)
		return nil
	})
	return c.s.commit(ctx, c.key(name), c.key(key), opts...)
}

// Remove removes a snapshot of the class.
func (c *Class) Remove(ctx context.Context, key string) error {
	return c.s.Remove(ctx, c.key(key))
}

// Walk calls fn for the class's snapshots matching one of the filters,
// which see the class's keys.
func (c *Class) Walk(ctx context.Context, fn snapshots.WalkFunc, fs ...string) error {
	return c.s.walk(ctx, c.own, fn, fs...)
}

// Cleanup finishes pending removals of the whole pool.
func (c *Class) Cleanup(ctx context.Context) error { return c.s.Cleanup(ctx) }

// Close does nothing: the Snapshotter owns the pool and database.
func (c *Class) Close() error { return nil }

// defaultSpace maps the stored keys of the default space to themselves.
func defaultSpace(k string) (string, bool) {
	return k, keySpace(k) == ""
}
