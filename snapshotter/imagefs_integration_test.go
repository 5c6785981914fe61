//go:build linux

package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/cadvisortest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

// kubeletView is what a kubelet reads of the image filesystem, through
// cAdvisor, checked against the pool's status.
type kubeletView struct {
	t *testing.T
	s *Snapshotter
	k *cadvisortest.Kubelet
}

// pool reads the pool's numbers from Status, and fails when the image
// filesystem is not mirrored.
func (v *kubeletView) pool() (total, used, available uint64, err error) {
	st, err := v.s.Status(context.Background())
	if err != nil {
		return 0, 0, 0, err
	}
	if !st.ImageFS.Mirrored || st.ImageFS.Error != "" {
		return 0, 0, 0, fmt.Errorf("the image filesystem is not mirrored: %+v", st.ImageFS)
	}
	return st.DataTotal, st.DataUsed, imageFSAvailable(st.DataTotal, st.DataUsed, st.DataBlockSize, v.s.cfg.MinFreeData), nil
}

// follow runs act, which changes the pool until changed holds, and waits
// until cAdvisor is within 1% of the changed pool: at most 10 s later.
func (v *kubeletView) follow(what string, act func() error, changed func(cadvisortest.Sample) bool) {
	v.t.Helper()
	w, err := v.k.Watch(imagefs.Dir(v.s.cfg.Root), v.pool)
	if err != nil {
		v.t.Fatal(err)
	}
	start := time.Now()
	if err := act(); err != nil {
		v.t.Fatalf("%s: %v", what, err)
	}
	acted := time.Since(start)
	x, lag, err := w.Until(changed, 3*time.Minute)
	if err != nil {
		v.t.Fatalf("%s: %v", what, err)
	}
	v.t.Logf("%s (took %s): cAdvisor within 1%% of the changed pool %s later: %s", what, acted.Round(time.Millisecond), lag.Round(time.Millisecond), x)
	if lag > 10*time.Second {
		v.t.Errorf("%s: cAdvisor followed the pool %s later, want within 10 s", what, lag)
	}
}

// settled checks, once the pool has not changed for two of the mirror's
// updates, that cAdvisor has the pool's numbers to the byte.
func (v *kubeletView) settled(what string) cadvisortest.Sample {
	v.t.Helper()
	x, err := v.k.Settled(imagefs.Dir(v.s.cfg.Root), v.pool, 2*imageFSPoll+time.Second, time.Minute)
	if err != nil {
		v.t.Fatal(err)
	}
	if x.Capacity != x.Total || x.Available != x.WantAvail {
		v.t.Errorf("%s, settled: %s", what, x)
	}
	return x
}

// write writes n bytes to a new file under dir, syncing every 4 MiB, so
// the pool fills while the test watches.
func write(dir string, n int) error {
	f, err := os.CreateTemp(dir, "fill-")
	if err != nil {
		return err
	}
	chunk := bytes.Repeat([]byte{0x5a}, 4<<20)
	for ; n > 0 && err == nil; n -= len(chunk) {
		if _, err = f.Write(chunk[:min(n, len(chunk))]); err == nil {
			err = f.Sync()
		}
	}
	return errors.Join(err, f.Close())
}

// TestIntegrationImageFS: what cAdvisor (the kubelet's code) reports for
// the image filesystem directory follows the pool as a container fills and
// empties it, as the pool grows, across a daemon restart (same device, so
// a running kubelet keeps reading it) and after a reboot.
func TestIntegrationImageFS(t *testing.T) {
	dmtest.Require(t)
	const mib = 1 << 20
	ctx := context.Background()
	root := t.TempDir()
	cfg := Config{Root: root, DataSize: 256 * mib, MaxDataSize: 320 * mib, GrowStep: 64 * mib, GrowHostReserve: 64 * mib,
		MetadataSize: 16 * mib, BaseSize: 1 << 30, MinFreeData: 5, ImageFSMirror: true}
	t.Cleanup(func() {
		if err := destroy(root); err != nil {
			t.Error(err)
		}
	})
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	// The kubelet starts after the daemon, as the units order them.
	k, err := cadvisortest.Start()
	if err != nil {
		t.Fatal(err)
	}
	v := &kubeletView{t: t, s: s, k: k}
	if first := v.settled("at start"); first.Capacity != 256*mib {
		t.Errorf("capacity %d, want the pool's 256 MiB", first.Capacity)
	}

	// A container fills the pool, then goes.
	m, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	used := v.settled("before the writes").Used
	v.follow("120 MiB written", func() error { return write(mnt, 120*mib) },
		func(x cadvisortest.Sample) bool { return x.Used >= used+100*mib })
	v.settled("120 MiB written")
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	v.follow("the container removed", func() error { return s.Remove(ctx, "a") },
		func(x cadvisortest.Sample) bool { return x.Used < used+50*mib })
	v.settled("the container removed")

	// Past the growth's low-water mark (64 MiB free) and short of full:
	// the pool grows, and the mirror with it.
	if m, err = s.Prepare(ctx, "b", ""); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, mnt); err != nil {
		t.Fatal(err)
	}
	used = v.settled("before the growth").Used
	v.follow("written past the low-water mark, grown", func() error { return write(mnt, int(230*mib-used)) },
		func(x cadvisortest.Sample) bool { return x.Total > 256*mib })
	if grown := v.settled("grown"); grown.Capacity != 320*mib {
		t.Errorf("capacity %d after growth, want 320 MiB", grown.Capacity)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}

	// A restart keeps the device the running kubelet knows.
	before := v.settled("before a restart")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = New(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	v.s = s
	after := v.settled("after a restart")
	if after.Major != before.Major || after.Minor != before.Minor || after.Capacity != 320*mib {
		t.Errorf("after a restart: %s; before: %s", after, before)
	}

	// A reboot: the mount, the devices and the pool are gone; the next
	// start sets them up again, and a kubelet started after it sees the
	// pool.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	rebootWithMirror(t, root)
	if s, err = New(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if v.k, err = cadvisortest.Start(); err != nil {
		t.Fatal(err)
	}
	v.s = s
	if r := v.settled("after a reboot"); r.Capacity != 320*mib {
		t.Errorf("capacity %d after a reboot, want 320 MiB", r.Capacity)
	}
	v.follow("the last container removed", func() error { return s.Remove(ctx, "b") },
		func(x cadvisortest.Sample) bool { return x.Used < used+50*mib })
}

// rebootWithMirror takes away what a reboot takes from the embedded pool
// of root: the mirror's mount (its loop device clears itself), the thin
// devices and the pool device (its loop devices go with it).
func rebootWithMirror(t *testing.T, root string) {
	t.Helper()
	if err := unix.Unmount(imagefs.Dir(root), 0); err != nil {
		t.Fatal(err)
	}
	name, err := LoopPoolName(root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := dmtest.RemoveDevices(ctx, dmsetup.DeviceNamePrefix(name)); err != nil {
		t.Fatal(err)
	}
	c, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Remove(ctx, name, dmsetup.RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "imagefs.img")); err != nil {
		t.Fatalf("the mirror's file is gone with the reboot: %v", err)
	}
}
