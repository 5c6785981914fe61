package soak

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// offlineCheck compares, with the daemon stopped, the database with the dm
// devices and the thin ids in the pool metadata, and the records with the
// model. It returns the problems found.
func offlineCheck(ctx context.Context, root, pool string, m *model) ([]string, error) {
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	db, err := storage.Open(ctx, filepath.Join(root, "metadata.db"), storage.WithTimeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	var (
		pi      storage.PoolInfo
		dbTx    uint64
		journal []storage.Entry
		warm    []storage.Warm
		recs    []storage.Snapshot
		ids     = map[uint32]string{}
	)
	err = db.View(ctx, func(tx *storage.Tx) error {
		var err error
		if pi, err = tx.PoolInfo(); err != nil {
			return err
		}
		if dbTx, err = tx.TransactionID(); err != nil {
			return err
		}
		if journal, err = tx.Journal(); err != nil {
			return err
		}
		if warm, err = tx.WarmDevices(); err != nil {
			return err
		}
		if err := tx.WalkSnapshots(func(s storage.Snapshot) error { recs = append(recs, s); return nil }); err != nil {
			return err
		}
		return tx.WalkIDs(func(id uint32, owner string) error { ids[id] = owner; return nil })
	})
	err = errors.Join(err, db.Close())
	if err != nil {
		return nil, fmt.Errorf("read database: %w", err)
	}

	for _, e := range journal {
		bad("pending journal entry %d: %s id=%d key=%q", e.Seq, e.Op, e.DeviceID, e.Key)
	}
	// A graceful stop deletes the warm devices.
	for _, w := range warm {
		bad("warm device %d of %q left after a graceful stop", w.DeviceID, w.Parent)
	}
	want := map[uint32]bool{pi.BaseDeviceID: true} // thin ids the pool must hold
	reserved := map[uint32]string{}                // ids reserved for commits: allocated, no device after a graceful stop
	active := map[uint32]storage.Snapshot{}        // ids that must have a dm device
	byKey := map[string]storage.Snapshot{}
	for _, s := range recs {
		byKey[s.Key] = s
	}
	for _, s := range recs {
		if s.State != storage.StateReady {
			bad("record %q is in state %v", s.Key, s.State)
		}
		if s.Kind == snapshots.KindView && s.DeviceID == 0 {
			// It shares its layer's device, which must be active.
			if p, ok := byKey[s.Parent]; !ok {
				bad("view %q shares the device of %q, which has no record", s.Key, s.Parent)
			} else {
				active[p.DeviceID] = s
			}
			continue
		}
		if s.CommitID != 0 {
			reserved[s.CommitID] = s.Key
		}
		if want[s.DeviceID] {
			bad("record %q shares thin id %d", s.Key, s.DeviceID)
		}
		want[s.DeviceID] = true
		if owner, ok := ids[s.DeviceID]; !ok || owner != s.Key {
			bad("record %q: id %d owned by %q (in use %v)", s.Key, s.DeviceID, owner, ok)
		}
		if s.Kind != snapshots.KindCommitted {
			active[s.DeviceID] = s
		}
	}
	for id, owner := range ids {
		if k, ok := reserved[id]; ok {
			if owner != k {
				bad("id %d reserved for the commit of %q is owned by %q", id, k, owner)
			}
			continue
		}
		if !want[id] {
			bad("id %d (owner %q) is in use but belongs to no record nor the base", id, owner)
		}
	}

	// The model: the same keys, kinds and parents.
	m.mu.Lock()
	for k, r := range m.snaps {
		s, ok := byKey[k]
		if !ok {
			bad("model has %s %q, database does not", r.kind, k)
		} else if s.Kind != r.kind || s.Parent != r.parent {
			bad("record %q is %s of %q, model says %s of %q", k, s.Kind, s.Parent, r.kind, r.parent)
		}
	}
	for k := range byKey {
		if _, ok := m.snaps[k]; !ok {
			bad("database has %q, model does not (removed acked: %v)", k, m.removed[k])
		}
	}
	m.mu.Unlock()

	c, err := dmsetup.Open()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	devs, err := c.List()
	if err != nil {
		return nil, err
	}
	prefix := dmsetup.DeviceNamePrefix(pool)
	seen := map[uint32]bool{}
	for _, d := range devs {
		if !strings.HasPrefix(d.Name, prefix) {
			continue
		}
		id, ok := dmsetup.ParseDeviceName(pool, d.Name)
		if !ok {
			bad("dm device %s: not %s<id>", d.Name, prefix)
			continue
		}
		seen[id] = true
		s, ok := active[id]
		if !ok {
			bad("dm device %s belongs to no active snapshot or view", d.Name)
			continue
		}
		tp, length, err := c.ThinTarget(d.Name)
		if want := dmsetup.BytesToSectors(s.Size); err != nil || tp.ID != id || length != want {
			bad("dm device %s of %q: thin id %d length %d, want id %d length %d: %v", d.Name, s.Key, tp.ID, length, id, want, err)
		}
	}
	for id, s := range active {
		if !seen[id] {
			bad("%s %q has no dm device %s", s.Kind, s.Key, dmsetup.DeviceName(pool, id))
		}
	}

	st, err := c.PoolStatus(pool)
	if err != nil {
		return nil, err
	}
	if st.Fail || st.Error || st.Mode != dmsetup.PoolModeRW || st.NeedsCheck {
		bad("pool status %+v", st)
	}
	if st.TransactionID != dbTx {
		bad("pool transaction id %d, database %d", st.TransactionID, dbTx)
	}
	poolIDs, err := poolThinIDs(ctx, c, pool)
	if err != nil {
		return nil, err
	}
	for id := range want {
		if !slices.Contains(poolIDs, id) {
			bad("thin id %d is recorded but not in the pool", id)
		}
	}
	for _, id := range poolIDs {
		if !want[id] {
			bad("thin id %d is in the pool but in no record nor the base (leaked)", id)
		}
	}
	return problems, nil
}

// poolThinIDs lists the thin ids in the pool's metadata through a metadata
// snapshot, read with thin_ls.
func poolThinIDs(ctx context.Context, c *dmsetup.Client, pool string) ([]uint32, error) {
	tbl, err := c.Table(pool)
	if err != nil || len(tbl) != 1 {
		return nil, fmt.Errorf("pool table %v: %w", tbl, err)
	}
	pp, err := dmsetup.ParsePoolParams(tbl[0].Params)
	if err != nil {
		return nil, err
	}
	meta, err := devNode(pp.MetadataDev)
	if err != nil {
		return nil, err
	}
	if err := c.ReserveMetadataSnap(pool); err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, "thin_ls", "-m", "--no-headers", "-o", "DEV", meta).Output()
	if rerr := c.ReleaseMetadataSnap(pool); rerr != nil {
		err = errors.Join(err, rerr)
	}
	if err != nil {
		if ee, ok := errors.AsType[*exec.ExitError](err); ok {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("thin_ls: %w", err)
	}
	var ids []uint32
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.TrimSpace(sc.Text())
		if f == "" {
			continue
		}
		v, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("thin_ls line %q: %w", f, err)
		}
		ids = append(ids, uint32(v))
	}
	return ids, sc.Err()
}

// devNode turns a table's major:minor (or a path) into a /dev node; without
// udev the kernel's name from sysfs is the one devtmpfs made.
func devNode(dev string) (string, error) {
	if strings.HasPrefix(dev, "/") {
		return dev, nil
	}
	b, err := os.ReadFile(filepath.Join("/sys/dev/block", dev, "uevent"))
	if err != nil {
		return "", err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if name, ok := strings.CutPrefix(l, "DEVNAME="); ok {
			return "/dev/" + name, nil
		}
	}
	return "", fmt.Errorf("no DEVNAME for block device %s", dev)
}

// checkReport is the part of `thin-snapshotter check --json` the test reads.
type checkReport struct {
	Pool      string            `json:"pool"`
	Records   int               `json:"records"`
	Findings  []json.RawMessage `json:"findings"`
	Remaining []json.RawMessage `json:"remaining"`
	Clean     bool              `json:"clean"`
}

// hasCheck reports whether the daemon binary has the check subcommand.
func hasCheck(ctx context.Context, bin string) bool {
	out, _, err := runCLI(ctx, bin, "--help")
	if err != nil {
		return false
	}
	for l := range strings.SplitSeq(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) > 0 && strings.TrimSuffix(f[0], ",") == "check" {
			return true
		}
	}
	return false
}

// runCheck runs `check --json` on a stopped daemon's root; stdout is the
// JSON report, stderr its logs.
func runCheck(ctx context.Context, d *daemon) (checkReport, []byte, int, error) {
	cmd := exec.CommandContext(ctx, d.bin, "--root", d.root, "--config", d.config, "check", "--json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := errors.AsType[*exec.ExitError](err); ok {
		code, err = ee.ExitCode(), nil
	}
	var r checkReport
	if err != nil {
		return r, stdout.Bytes(), code, err
	}
	if code != 0 && code != 1 {
		return r, stdout.Bytes(), code, fmt.Errorf("check exit %d: %s%s", code, stdout.Bytes(), stderr.Bytes())
	}
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return r, stdout.Bytes(), code, fmt.Errorf("check JSON: %w: %s (stderr %s)", err, stdout.Bytes(), stderr.Bytes())
	}
	if r.Clean != (code == 0) {
		return r, stdout.Bytes(), code, fmt.Errorf("check exit %d but clean=%v", code, r.Clean)
	}
	return r, stdout.Bytes(), code, nil
}
