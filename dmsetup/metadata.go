//go:build linux

package dmsetup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// metadataTools are tried in order to list the thin ids of a metadata
// snapshot (thin-provisioning-tools).
var metadataTools = []struct {
	bin   string
	args  []string
	parse func([]byte) ([]uint32, error)
}{
	{"thin_ls", []string{"--metadata-snap", "--no-headers", "-o", "DEV"}, parseThinLs},
	{"thin_dump", []string{"--metadata-snap", "--skip-mappings"}, parseThinDump},
}

// metadataToolTimeout bounds one run of thin_ls or thin_dump.
const metadataToolTimeout = 5 * time.Minute

// MetadataThinIDs lists, ascending, the thin device ids in the metadata of
// thin pool pool. It reserves a metadata snapshot, lists the ids in it and
// releases it (ReserveMetadataSnapshot, ThinIDs, Release).
func (c *Client) MetadataThinIDs(ctx context.Context, pool string) ([]uint32, error) {
	m, err := c.ReserveMetadataSnapshot(pool)
	if err != nil {
		return nil, err
	}
	ids, err := m.ThinIDs(ctx)
	return ids, errors.Join(err, m.Release())
}

// MetadataSnapshot is a reserved metadata snapshot of a thin pool: the
// pool's metadata as it was when reserved, readable with thin_ls (or
// thin_dump) while the pool goes on. A pool holds one at a time; Release
// drops it.
type MetadataSnapshot struct {
	c       *Client
	pool    string
	node    string // the metadata device
	cleanup func()
	tool    int // index in metadataTools
	bin     string
}

// ReserveMetadataSnapshot reserves a metadata snapshot of pool. Without
// thin_ls or thin_dump in PATH the error is errdefs.ErrNotImplemented, and
// nothing is reserved.
func (c *Client) ReserveMetadataSnapshot(pool string) (*MetadataSnapshot, error) {
	m := &MetadataSnapshot{c: c, pool: pool, tool: -1}
	for i, t := range metadataTools {
		if path, err := exec.LookPath(t.bin); err == nil {
			m.tool, m.bin = i, path
			break
		}
	}
	if m.tool < 0 {
		return nil, fmt.Errorf("neither thin_ls nor thin_dump found in PATH: install thin-provisioning-tools: %w", errdefs.ErrNotImplemented)
	}
	params, _, err := c.PoolTarget(pool)
	if errors.Is(err, ErrMalformed) {
		return nil, fmt.Errorf("device %s is not a thin pool: %w: %w", pool, err, errdefs.ErrInvalidArgument)
	} else if err != nil {
		return nil, fmt.Errorf("table of pool %s: %w", pool, err)
	}
	if m.node, m.cleanup, err = blockNode(params.MetadataDev); err != nil {
		return nil, fmt.Errorf("metadata device of pool %s: %w", pool, err)
	}
	if err := c.ReserveMetadataSnap(pool); err != nil {
		m.cleanup()
		if IsBusy(err) {
			return nil, fmt.Errorf("pool %s already has a metadata snapshot (held by another tool, or left by an interrupted check: `dmsetup message %s 0 release_metadata_snap` drops it): %w", pool, pool, err)
		}
		return nil, fmt.Errorf("reserve_metadata_snap on %s: %w", pool, err)
	}
	return m, nil
}

// ThinIDs lists, ascending, the thin device ids in the snapshot.
func (m *MetadataSnapshot) ThinIDs(ctx context.Context) ([]uint32, error) {
	t := metadataTools[m.tool]
	tctx, cancel := context.WithTimeout(ctx, metadataToolTimeout)
	defer cancel()
	cmd := exec.CommandContext(tctx, m.bin, append(slices.Clone(t.args), m.node)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %v: %w: %s", t.bin, cmd.Args[1:], err, strings.TrimSpace(stderr.String()))
	}
	ids, err := t.parse(out)
	if err != nil {
		return nil, fmt.Errorf("%s output: %w", t.bin, err)
	}
	return ids, nil
}

// Release drops the snapshot.
func (m *MetadataSnapshot) Release() error {
	defer m.cleanup()
	if err := m.c.ReleaseMetadataSnap(m.pool); err != nil {
		return fmt.Errorf("release_metadata_snap on %s: %w", m.pool, err)
	}
	return nil
}

// blockNode returns the path of a block device node for dev, which a table
// names by path or as major:minor. A path is returned as it is. For
// major:minor it is /dev/<the kernel's name from sysfs> when that node
// exists, else a temporary node that cleanup removes.
func blockNode(dev string) (string, func(), error) {
	noop := func() {}
	major, minor, err := parseMajorMinor(dev)
	if err != nil {
		return dev, noop, nil // a path
	}
	want := unix.Mkdev(major, minor)
	if b, err := os.ReadFile(filepath.Join(sysBlockDir(major, minor), "uevent")); err == nil {
		if name, ok := ueventDevName(b); ok {
			path := filepath.Join("/dev", name)
			var st unix.Stat_t
			if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == want {
				return path, noop, nil
			}
		}
	}
	dir, err := os.MkdirTemp("/dev", ".dmsetup-node-")
	if err != nil {
		return "", noop, err
	}
	path := filepath.Join(dir, "dev")
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(want)); err != nil {
		_ = os.RemoveAll(dir)
		return "", noop, &os.PathError{Op: "mknod", Path: path, Err: err}
	}
	return path, func() { _ = os.RemoveAll(dir) }, nil
}
