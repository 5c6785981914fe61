//go:build linux

package dmsetup

// Integration tests: they need root and a kernel with dm-thin. Outside the VM
// bench they skip when device-mapper is missing; with THIN_TEST_REQUIRE_DM=1
// (set by test/vm) they fail instead. Run them with -run Integration.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

func TestIntegrationVersionAndTargets(t *testing.T) {
	c := requireDM(t)
	v, err := c.version()
	if err != nil {
		t.Fatal(err)
	}
	if v.Major != 4 || !v.atLeast(Version{4, 27, 0}) {
		t.Errorf("dm ioctl version %s", v)
	}
	tvs, err := c.targetVersions()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Version{}
	for _, tv := range tvs {
		byName[tv.Name] = tv.Version
	}
	for _, want := range []string{"thin-pool", "thin", "linear", "error"} {
		got, ok := byName[want]
		if !ok {
			t.Errorf("target %s missing from %v", want, tvs)
			continue
		}
		one, err := c.TargetVersion(want)
		if err != nil || one != got {
			t.Errorf("TargetVersion(%s) = %s, %v; list says %s", want, one, err, got)
		}
	}
	if _, err := c.TargetVersion("no-such-target"); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unknown target: %v, want EINVAL", err)
	}
	if haveCLI() {
		// "thin-pool        v1.23.0" per line.
		for line := range strings.SplitSeq(strings.TrimSpace(run(t, "dmsetup", "targets")), "\n") {
			f := strings.Fields(line)
			if len(f) != 2 {
				t.Fatalf("dmsetup targets line %q", line)
			}
			if got, ok := byName[f[0]]; !ok || "v"+got.String() != f[1] {
				t.Errorf("dmsetup targets says %s %s, we say %s (present %v)", f[0], f[1], got, ok)
			}
		}
	}
}

// TestIntegrationDeviceLifecycle drives the generic operations with linear
// and error targets on a loop device.
func TestIntegrationDeviceLifecycle(t *testing.T) {
	c := requireDM(t)
	file := filepath.Join(t.TempDir(), "backing")
	if err := createSparse(file, 16<<20, false); err != nil {
		t.Fatal(err)
	}
	loop, err := attachLoop(file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(loop.close)

	name := devName("linear")
	uuid := "DMTEST-" + name
	table := []Target{
		{Start: 0, Length: 8192, Type: "linear", Params: loop.devArg() + " 0"},
		{Start: 8192, Length: 8192, Type: "linear", Params: loop.devArg() + " 16384"},
	}
	if err := c.Create(name, table, CreateOptions{UUID: uuid}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, name) })

	info, err := c.Info(name)
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != name || info.UUID != uuid || !info.LiveTable || info.InactiveTable || info.Suspended ||
		info.ReadOnly || info.TargetCount != 2 || info.OpenCount != 0 || info.Major == 0 {
		t.Errorf("info after create: %+v", info)
	}
	var st unix.Stat_t
	if err := unix.Stat(c.DevicePath(name), &st); err != nil {
		t.Fatalf("device node: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != unix.Mkdev(info.Major, info.Minor) {
		t.Errorf("node %s is %o %d:%d, device is %d:%d", c.DevicePath(name), st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev), info.Major, info.Minor)
	}
	devs, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(devs, func(d Device) bool { return d.Name == name })
	if i < 0 || devs[i].Major != info.Major || devs[i].Minor != info.Minor || devs[i].UUID != uuid {
		t.Errorf("list: %+v", devs)
	}
	got, err := c.Table(name)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, table) {
		t.Errorf("table %+v, loaded %+v", got, table)
	}
	sts, err := c.status(name, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) != 2 || sts[0].Type != "linear" || sts[1].Start != 8192 {
		t.Errorf("status %+v", sts)
	}

	// The kernel says EBUSY for a taken name; it still counts as "exists".
	if err := c.Create(name, table, CreateOptions{}); !errors.Is(err, unix.EBUSY) || !errdefs.IsAlreadyExists(err) || !IsExist(err) {
		t.Errorf("duplicate create: %v", err)
	}

	// Suspend variants, reload into the inactive slot, swap on resume.
	for _, opts := range []SuspendOptions{{}, {NoFlush: true}, {SkipLockfs: true}} {
		if err := c.Suspend(name, opts); err != nil {
			t.Fatal(err)
		}
		if info, _ := c.Info(name); !info.Suspended {
			t.Errorf("not suspended after Suspend(%+v)", opts)
		}
		if err := c.Resume(name); err != nil {
			t.Fatal(err)
		}
	}
	errTable := []Target{{Start: 0, Length: 4096, Type: "error"}}
	if err := c.Load(name, errTable, false); err != nil {
		t.Fatal(err)
	}
	if info, _ := c.Info(name); !info.InactiveTable || info.TargetCount != 2 {
		t.Errorf("after load: %+v", info)
	}
	if err := c.ClearTable(name); err != nil {
		t.Fatal(err)
	}
	if info, _ := c.Info(name); info.InactiveTable {
		t.Errorf("inactive table still there after clear: %+v", info)
	}
	if err := c.Load(name, errTable, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Suspend(name, SuspendOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(name); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Table(name); !slices.Equal(got, []Target{{0, 4096, "error", ""}}) {
		t.Errorf("table after swap: %+v", got)
	}
	if info, _ := c.Info(name); !info.ReadOnly || info.TargetCount != 1 || info.InactiveTable {
		t.Errorf("after swap: %+v", info)
	}

	if err := c.Remove(context.Background(), name, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(c.DevicePath(name)); !os.IsNotExist(err) {
		t.Errorf("node left after remove: %v", err)
	}
	for op, err := range map[string]error{
		"info":   func() error { _, err := c.Info(name); return err }(),
		"remove": c.Remove(context.Background(), name, RemoveOptions{}),
		"status": func() error { _, err := c.status(name, 0); return err }(),
	} {
		if !errors.Is(err, unix.ENXIO) || !IsNotFound(err) || !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s of removed device: %v", op, err)
		}
	}

	// A table the kernel rejects leaves no half-made device behind.
	bad := []Target{{Start: 0, Length: 8, Type: "linear", Params: "7:0 0 extra-argument"}}
	if err := c.Create(name, bad, CreateOptions{}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("bad table: %v, want EINVAL", err)
	}
	if _, err := c.Info(name); !errors.Is(err, unix.ENXIO) {
		t.Errorf("half-made device left: %v", err)
	}
	// Read-only create.
	if err := c.Create(name, table[:1], CreateOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if info, _ := c.Info(name); !info.ReadOnly {
		t.Errorf("read-only create: %+v", info)
	}
	// Depending on the kernel the open or the write is refused.
	if f, err := os.OpenFile(c.DevicePath(name), os.O_WRONLY, 0); err == nil {
		_, err = f.WriteAt(make([]byte, 4096), 0)
		if err == nil {
			err = f.Sync()
		}
		f.Close()
		if err == nil {
			t.Error("wrote to a read-only device")
		}
	}
	if err := c.Remove(context.Background(), name, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestIntegrationRemoveBusy(t *testing.T) {
	c := requireDM(t)
	pool := newLoopPool(t, c)
	if err := c.CreateThin(pool.Name, 1); err != nil {
		t.Fatal(err)
	}
	name := devName("busy")
	dev := activateThin(t, c, pool, name, 1)
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := c.Info(name); info.OpenCount != 1 {
		t.Errorf("open count %d", info.OpenCount)
	}
	start := time.Now()
	err = c.Remove(context.Background(), name, RemoveOptions{Retries: 3, Delay: 10 * time.Millisecond})
	if !errors.Is(err, unix.EBUSY) || !IsBusy(err) {
		t.Fatalf("remove of open device: %v, want EBUSY", err)
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Errorf("3 retries of 10ms took %v", d)
	}
	if err := c.Remove(context.Background(), name, RemoveOptions{Retries: -1}); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("remove without retries: %v", err)
	}
	// Deleting the thin id of an open device is refused too.
	if err := c.DeleteThin(pool.Name, 1); !errors.Is(err, unix.EBUSY) {
		t.Errorf("delete of active thin: %v, want EBUSY", err)
	}
	// A cancelled context stops the retries.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	err = c.Remove(ctx, name, RemoveOptions{Retries: 1000, Delay: 10 * time.Millisecond})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, unix.EBUSY) {
		t.Errorf("remove with expiring context: %v", err)
	}
	// Retries succeed once the holder lets go.
	go func() {
		time.Sleep(100 * time.Millisecond)
		f.Close()
	}()
	if err := c.Remove(context.Background(), name, RemoveOptions{Retries: 100, Delay: 10 * time.Millisecond}); err != nil {
		t.Fatalf("remove with retries: %v", err)
	}

	// Deferred remove: succeeds while open, device goes on last close.
	dev = activateThin(t, c, pool, name, 1)
	if f, err = os.Open(dev); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(context.Background(), name, RemoveOptions{Deferred: true}); err != nil {
		f.Close()
		t.Fatal(err)
	}
	info, err := c.Info(name)
	if err != nil || !info.DeferredRemove {
		t.Errorf("after deferred remove: %+v %v", info, err)
	}
	f.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := c.Info(name); errors.Is(err, unix.ENXIO) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("deferred remove did not happen on close")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The stale node is replaced by the next create of that name.
	dev = activateThin(t, c, pool, name, 1)
	info, _ = c.Info(name)
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil || st.Rdev != unix.Mkdev(info.Major, info.Minor) {
		t.Errorf("node after re-create: %v rdev %d:%d want %d:%d", err, unix.Major(st.Rdev), unix.Minor(st.Rdev), info.Major, info.Minor)
	}
	removeIfExists(t, c, name)
	if err := c.DeleteThin(pool.Name, 1); err != nil {
		t.Fatal(err)
	}
}

func writeRandom(t *testing.T, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

func expectFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("read %s: %v", path, err)
		return
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s: content differs (%d bytes, want %d)", path, len(got), len(want))
	}
}

func expectMissing(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("%s should not exist: %v", path, err)
	}
}

// TestIntegrationThinLoopPool is the thin-provisioning path on a loop pool:
// thin devices with a file system, snapshots of inactive and active origins,
// delete, the pool errors, and reopening the pool from its files.
func TestIntegrationThinLoopPool(t *testing.T) {
	c := requireDM(t)
	pool := newLoopPool(t, c)
	if pool.Reused || pool.BlockSizeSectors != 128 || pool.DataSectors != testDataSize/SectorSize {
		t.Errorf("pool %+v", pool)
	}
	st, err := c.PoolStatus(pool.Name)
	if err != nil {
		t.Fatal(err)
	}
	if st.TransactionID != 0 || st.UsedDataBlocks != 0 || st.TotalDataBlocks != testDataSize/(128*SectorSize) ||
		st.TotalMetaBlocks != testMetaSize/4096 || st.UsedMetaBlocks == 0 || st.HasHeldRoot || st.Mode != PoolModeRW ||
		st.NeedsCheck || st.NoSpacePolicy != QueueIfNoSpace {
		t.Errorf("fresh pool status %+v", st)
	}
	table, err := c.Table(pool.Name)
	if err != nil {
		t.Fatal(err)
	}
	if pp, err := ParsePoolParams(table[0].Params); err != nil || !pp.SkipBlockZeroing || pp.BlockSizeSectors != 128 {
		t.Errorf("pool table %q: %+v %v", table[0].Params, pp, err)
	}

	// Origin: thin 1 with a file system and a file.
	if err := c.CreateThin(pool.Name, 1); err != nil {
		t.Fatal(err)
	}
	origin := devName("origin")
	originDev := activateThin(t, c, pool, origin, 1)
	if ts, err := c.ThinStatus(origin); err != nil || ts.MappedSectors != 0 || ts.HasHighest {
		t.Errorf("new thin status %+v %v", ts, err)
	}
	mkfs(t, originDev)
	mnt := mount(t, originDev)
	fileA := writeRandom(t, filepath.Join(mnt, "a"), 1<<20)
	unmount(t, mnt)
	// PoolStatus commits the metadata, so PoolStatusNoCommit right after
	// it must report the same.
	committed, err := c.PoolStatus(pool.Name)
	if err != nil {
		t.Fatal(err)
	}
	if nc, err := c.PoolStatusNoCommit(pool.Name); err != nil || nc != committed || nc.UsedDataBlocks < 1<<20/(128*SectorSize) {
		t.Errorf("status without commit %+v %v, with one %+v", nc, err, committed)
	}
	ts, err := c.ThinStatus(origin)
	if err != nil || ts.MappedSectors < 1<<20/SectorSize || !ts.HasHighest || ts.HighestMapped >= thinSectors {
		t.Errorf("thin status after writing: %+v %v", ts, err)
	}
	mnt = mount(t, originDev)
	expectFile(t, filepath.Join(mnt, "a"), fileA)
	unmount(t, mnt)

	// Snapshot of the inactive origin.
	removeIfExists(t, c, origin)
	if err := c.CreateSnap(pool.Name, 2, 1); err != nil {
		t.Fatal(err)
	}
	snap2 := devName("snap2")
	snapMnt := mount(t, activateThin(t, c, pool, snap2, 2))
	expectFile(t, filepath.Join(snapMnt, "a"), fileA)
	writeRandom(t, filepath.Join(snapMnt, "only-in-snap2"), 4096)

	// Snapshot of the active, mounted origin: suspend (flushes and freezes
	// the file system), snapshot, resume.
	originDev = activateThin(t, c, pool, origin, 1)
	mnt = mount(t, originDev)
	expectMissing(t, filepath.Join(mnt, "only-in-snap2"))
	fileB := writeRandom(t, filepath.Join(mnt, "b"), 256<<10)
	if err := c.Suspend(origin, SuspendOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateSnap(pool.Name, 3, 1); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(origin); err != nil {
		t.Fatal(err)
	}
	writeRandom(t, filepath.Join(mnt, "after-snap3"), 4096)
	snap3 := devName("snap3")
	snap3Mnt := mount(t, activateThin(t, c, pool, snap3, 3))
	expectFile(t, filepath.Join(snap3Mnt, "a"), fileA)
	expectFile(t, filepath.Join(snap3Mnt, "b"), fileB)
	expectMissing(t, filepath.Join(snap3Mnt, "after-snap3"))
	expectMissing(t, filepath.Join(snap3Mnt, "only-in-snap2"))

	// Pool-level errors.
	if err := c.CreateThin(pool.Name, 1); !errors.Is(err, unix.EEXIST) || !errdefs.IsAlreadyExists(err) {
		t.Errorf("duplicate create_thin: %v, want EEXIST", err)
	}
	if err := c.CreateSnap(pool.Name, 2, 1); !errors.Is(err, unix.EEXIST) {
		t.Errorf("duplicate create_snap: %v, want EEXIST", err)
	}
	if err := c.DeleteThin(pool.Name, 99); !errors.Is(err, unix.ENODATA) || !errdefs.IsNotFound(err) {
		t.Errorf("delete of unknown id: %v, want ENODATA", err)
	}
	if err := c.SetTransactionID(pool.Name, 5, 6); !errors.Is(err, unix.EINVAL) {
		t.Errorf("set_transaction_id with wrong old id: %v, want EINVAL", err)
	}
	if err := c.SetTransactionID(pool.Name, 0, 7); err != nil {
		t.Fatal(err)
	}
	if err := c.ReserveMetadataSnap(pool.Name); err != nil {
		t.Fatal(err)
	}
	if st, err := c.PoolStatus(pool.Name); err != nil || st.TransactionID != 7 || !st.HasHeldRoot || st.HeldMetadataRoot == 0 {
		t.Errorf("status with held root: %+v %v", st, err)
	}
	if err := c.ReserveMetadataSnap(pool.Name); !errors.Is(err, unix.EBUSY) {
		t.Errorf("second reserve_metadata_snap: %v, want EBUSY", err)
	}
	if err := c.ReleaseMetadataSnap(pool.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := c.message(pool.Name, 0, "no_such_message"); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unknown message: %v, want EINVAL", err)
	}

	// Tear down the devices and delete every thin: data blocks return.
	for _, m := range []string{mnt, snapMnt, snap3Mnt} {
		unmount(t, m)
	}
	for _, n := range []string{origin, snap2, snap3} {
		if err := c.Remove(context.Background(), n, RemoveOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DeleteThin(pool.Name, 2); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteThin(pool.Name, 3); err != nil {
		t.Fatal(err)
	}
	st, err = c.PoolStatus(pool.Name)
	if err != nil || st.UsedDataBlocks == 0 || st.HasHeldRoot {
		t.Errorf("status with origin left: %+v %v", st, err)
	}

	// Reuse while running, then "reboot": pool gone, files kept.
	again, err := CreateLoopPool(context.Background(), c, LoopPoolConfig{Dir: filepath.Dir(pool.DataFile), Name: pool.Name})
	if err != nil || !again.Reused || again.DataLoop != pool.DataLoop || again.MetadataLoop != pool.MetadataLoop || again.DataSectors != pool.DataSectors {
		t.Fatalf("reuse of running pool: %+v %v", again, err)
	}
	notPool := devName("notpool")
	if err := c.Create(notPool, []Target{{Length: 8, Type: "error"}}, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, notPool) })
	if _, err := CreateLoopPool(context.Background(), c, LoopPoolConfig{Dir: t.TempDir(), Name: notPool, DataSize: testDataSize, MetadataSize: testMetaSize}); !errdefs.IsAlreadyExists(err) {
		t.Errorf("pool name taken by a device that is not a pool: %v", err)
	}
	if _, err := CreateLoopPool(context.Background(), c, LoopPoolConfig{Dir: t.TempDir(), Name: pool.Name, DataSize: testDataSize}); !errdefs.IsAlreadyExists(err) {
		t.Errorf("pool name taken by other files: %v", err)
	}
	if err := pool.close(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{pool.DataLoop, pool.MetadataLoop} {
		waitLoopDetached(t, l)
	}
	reopened, err := CreateLoopPool(context.Background(), c, LoopPoolConfig{Dir: filepath.Dir(pool.DataFile), Name: pool.Name})
	if err != nil || reopened.Reused {
		t.Fatalf("reopen: %+v %v", reopened, err)
	}
	st2, err := c.PoolStatus(pool.Name)
	if err != nil || st2.TransactionID != 7 || st2.UsedDataBlocks != st.UsedDataBlocks {
		t.Errorf("reopened pool lost its metadata: %+v %v (before %+v)", st2, err, st)
	}
	if err := c.CreateThin(pool.Name, 1); !errors.Is(err, unix.EEXIST) {
		t.Errorf("thin 1 gone after reopen: %v", err)
	}
	mnt = mount(t, activateThin(t, c, reopened, origin, 1))
	expectFile(t, filepath.Join(mnt, "a"), fileA)
	expectFile(t, filepath.Join(mnt, "b"), fileB)
	unmount(t, mnt)
	removeIfExists(t, c, origin)
	if err := c.DeleteThin(pool.Name, 1); err != nil {
		t.Fatal(err)
	}
	if st, err := c.PoolStatus(pool.Name); err != nil || st.UsedDataBlocks != 0 {
		t.Errorf("status after deleting everything: %+v %v", st, err)
	}
	// newLoopPool's cleanup destroys the reopened pool and the files.
}

// TestIntegrationPoolOnDisk builds the pool on the VM's scratch disk, split
// into metadata and data with linear targets.
func TestIntegrationPoolOnDisk(t *testing.T) {
	c := requireDM(t)
	disk := os.Getenv("THIN_TEST_DISK")
	if disk == "" {
		t.Skip("THIN_TEST_DISK not set (the VM bench sets it to its scratch disk)")
	}
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	metaSectors := BytesToSectors(16 << 20)
	diskSectors := BytesToSectors(size)
	if diskSectors < metaSectors+1024 {
		t.Fatalf("%s has only %d bytes", disk, size)
	}
	dataSectors := min(diskSectors-metaSectors, BytesToSectors(1<<30)) / 128 * 128
	meta, data, poolName := devName("meta"), devName("data"), devName("diskpool")
	for _, d := range []struct {
		name          string
		offset, count Sectors
	}{{meta, 0, metaSectors}, {data, metaSectors, dataSectors}} {
		tg := Target{Length: d.count, Type: "linear", Params: disk + " " + strconv.FormatUint(uint64(d.offset), 10)}
		if err := c.Create(d.name, []Target{tg}, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { removeIfExists(t, c, d.name) })
	}
	// Fresh metadata: zero its header so the kernel formats it.
	mf, err := os.OpenFile(c.DevicePath(meta), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = mf.Write(make([]byte, 4096))
	if err == nil {
		err = mf.Sync()
	}
	mf.Close()
	if err != nil {
		t.Fatal(err)
	}
	tg, err := poolTable(dataSectors, PoolParams{
		MetadataDev: c.DevicePath(meta), DataDev: c.DevicePath(data),
		BlockSizeSectors: 128, SkipBlockZeroing: true, ErrorIfNoSpace: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Create(poolName, []Target{tg}, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, poolName) })
	st, err := c.PoolStatus(poolName)
	if err != nil || st.TotalDataBlocks != uint64(dataSectors/128) || st.NoSpacePolicy != ErrorIfNoSpace || st.Mode != PoolModeRW {
		t.Fatalf("disk pool status %+v %v", st, err)
	}
	pool := &LoopPool{Name: poolName, DevicePath: c.DevicePath(poolName)}

	if err := c.CreateThin(poolName, 10); err != nil {
		t.Fatal(err)
	}
	thin := devName("diskthin")
	dev := activateThin(t, c, pool, thin, 10)
	mkfs(t, dev)
	mnt := mount(t, dev)
	content := writeRandom(t, filepath.Join(mnt, "f"), 2<<20)
	unmount(t, mnt)
	if err := c.Suspend(thin, SuspendOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateSnap(poolName, 11, 10); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(thin); err != nil {
		t.Fatal(err)
	}
	snap := devName("disksnap")
	snapMnt := mount(t, activateThin(t, c, pool, snap, 11))
	expectFile(t, filepath.Join(snapMnt, "f"), content)
	unmount(t, snapMnt)
	mnt = mount(t, dev)
	expectFile(t, filepath.Join(mnt, "f"), content)
	unmount(t, mnt)
	for _, n := range []string{thin, snap} {
		if err := c.Remove(context.Background(), n, RemoveOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []uint32{11, 10} {
		if err := c.DeleteThin(poolName, id); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := c.PoolStatus(poolName); err != nil || st.UsedDataBlocks != 0 {
		t.Errorf("disk pool after delete: %+v %v", st, err)
	}
	for _, n := range []string{poolName, data, meta} {
		if err := c.Remove(context.Background(), n, RemoveOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// cliStatus returns the target fields of `dmsetup status name` for a
// single-target device: start, length, type, then the status words.
func cliFields(t *testing.T, args ...string) []string {
	t.Helper()
	out := strings.TrimSpace(run(t, "dmsetup", args...))
	if strings.Contains(out, "\n") {
		t.Fatalf("dmsetup %q: more than one line: %q", args, out)
	}
	return strings.Fields(out)
}

// TestIntegrationStatusMatchesCLI checks every parsed status field, the
// table, info and list against the dmsetup tool's view of the same devices.
func TestIntegrationStatusMatchesCLI(t *testing.T) {
	c := requireDM(t)
	if !haveCLI() {
		if os.Getenv(requireDMEnv) == "1" {
			t.Fatal("dmsetup CLI missing")
		}
		t.Skip("dmsetup CLI missing")
	}
	pool := newLoopPool(t, c)
	if err := c.CreateThin(pool.Name, 1); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateThin(pool.Name, 2); err != nil {
		t.Fatal(err)
	}
	used, empty := devName("used"), devName("empty")
	dev := activateThin(t, c, pool, used, 1)
	activateThin(t, c, pool, empty, 2)
	// Map some blocks at a known place.
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{1}, 1<<20)
	_, err = f.WriteAt(buf, 8<<20)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetTransactionID(pool.Name, 0, 42); err != nil {
		t.Fatal(err)
	}

	checkPool := func(held bool) {
		t.Helper()
		ps, err := c.PoolStatus(pool.Name)
		if err != nil {
			t.Fatal(err)
		}
		f := cliFields(t, "status", pool.Name)
		if len(f) < 12 || f[2] != "thin-pool" {
			t.Fatalf("dmsetup status %s: %q", pool.Name, f)
		}
		heldWant := "-"
		if ps.HasHeldRoot {
			heldWant = strconv.FormatUint(ps.HeldMetadataRoot, 10)
		}
		needsCheck := "-"
		if ps.NeedsCheck {
			needsCheck = "needs_check"
		}
		for _, c := range []struct{ field, ours, cli string }{
			{"length", strconv.FormatUint(uint64(pool.DataSectors), 10), f[1]},
			{"transaction id", strconv.FormatUint(ps.TransactionID, 10), f[3]},
			{"metadata blocks", fmt.Sprintf("%d/%d", ps.UsedMetaBlocks, ps.TotalMetaBlocks), f[4]},
			{"data blocks", fmt.Sprintf("%d/%d", ps.UsedDataBlocks, ps.TotalDataBlocks), f[5]},
			{"held root", heldWant, f[6]},
			{"mode", string(ps.Mode), f[7]},
			{"discard", string(ps.DiscardMode), f[8]},
			{"no-space policy", string(ps.NoSpacePolicy), f[9]},
			{"needs_check", needsCheck, f[10]},
			{"metadata low watermark", strconv.FormatUint(ps.MetadataLowWatermark, 10), f[11]},
		} {
			if c.ours != c.cli {
				t.Errorf("pool %s: ours %q, dmsetup %q", c.field, c.ours, c.cli)
			}
		}
		if ps.TransactionID != 42 || ps.UsedDataBlocks != 16 || ps.HasHeldRoot != held || !ps.HasMetadataLowWatermark {
			t.Errorf("pool status %+v", ps)
		}
	}
	checkPool(false)
	if err := c.ReserveMetadataSnap(pool.Name); err != nil {
		t.Fatal(err)
	}
	checkPool(true)
	if err := c.ReleaseMetadataSnap(pool.Name); err != nil {
		t.Fatal(err)
	}

	for _, name := range []string{used, empty} {
		ts, err := c.ThinStatus(name)
		if err != nil {
			t.Fatal(err)
		}
		f := cliFields(t, "status", name)
		highest := "-"
		if ts.HasHighest {
			highest = strconv.FormatUint(uint64(ts.HighestMapped), 10)
		}
		if len(f) != 5 || f[2] != "thin" || f[3] != strconv.FormatUint(uint64(ts.MappedSectors), 10) || f[4] != highest {
			t.Errorf("thin %s: ours %+v, dmsetup %q", name, ts, f)
		}
		tbl, err := c.Table(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(cliFields(t, "table", name), " "); got != tbl[0].String() {
			t.Errorf("table %s: ours %q, dmsetup %q", name, tbl[0].String(), got)
		}
		info, err := c.Info(name)
		if err != nil {
			t.Fatal(err)
		}
		got := strings.TrimSpace(run(t, "dmsetup", "info", "-c", "--noheadings", "--separator", ",",
			"-o", "name,major,minor,open,segments,events,uuid", name))
		want := fmt.Sprintf("%s,%d,%d,%d,%d,%d,%s", info.Name, info.Major, info.Minor, info.OpenCount, info.TargetCount, info.EventNr, info.UUID)
		if got != want {
			t.Errorf("info %s: ours %q, dmsetup %q", name, want, got)
		}
	}
	// The only-mapped extent we wrote: 1MiB at 8MiB.
	if ts, _ := c.ThinStatus(used); ts.MappedSectors != 1<<20/SectorSize || ts.HighestMapped != (9<<20)/SectorSize-1 {
		t.Errorf("used thin status %+v", ts)
	}
	if ts, _ := c.ThinStatus(empty); ts.MappedSectors != 0 || ts.HasHighest {
		t.Errorf("empty thin status %+v", ts)
	}

	// dmsetup ls: "name\t(major:minor)" (or "(major, minor)" on old tools).
	devs, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	var ours, theirs []string
	for _, d := range devs {
		ours = append(ours, fmt.Sprintf("%s %d:%d", d.Name, d.Major, d.Minor))
	}
	for line := range strings.SplitSeq(strings.TrimSpace(run(t, "dmsetup", "ls")), "\n") {
		r := strings.NewReplacer("(", "", ")", "", ", ", ":", "\t", " ")
		theirs = append(theirs, strings.Join(strings.Fields(r.Replace(line)), " "))
	}
	slices.Sort(ours)
	slices.Sort(theirs)
	if !slices.Equal(ours, theirs) {
		t.Errorf("list: ours %q, dmsetup %q", ours, theirs)
	}

	for _, n := range []string{used, empty} {
		removeIfExists(t, c, n)
	}
	for _, id := range []uint32{1, 2} {
		if err := c.DeleteThin(pool.Name, id); err != nil {
			t.Fatal(err)
		}
	}
}

// TestIntegrationManyThins creates, activates, removes and deletes 500 thin
// devices; listing them also exercises buffer growth.
func TestIntegrationManyThins(t *testing.T) {
	c := requireDM(t)
	pool := newLoopPool(t, c)
	const n = 500
	prefix := devName("many")
	names := make([]string, n)
	for i := range n {
		id := uint32(i + 1)
		if err := c.CreateThin(pool.Name, id); err != nil {
			t.Fatal(err)
		}
		names[i] = fmt.Sprintf("%s-%03d", prefix, i)
		tg, err := ThinTable(thinSectors, pool.DevicePath, id, "")
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Create(names[i], []Target{tg}, CreateOptions{UUID: "DMTEST-" + names[i]}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, name := range names {
			removeIfExists(t, c, name)
		}
	})
	devs, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, d := range devs {
		if strings.HasPrefix(d.Name, prefix) {
			found++
			if d.UUID != "DMTEST-"+d.Name {
				t.Errorf("%s has uuid %q", d.Name, d.UUID)
			}
			if _, err := os.Stat(c.DevicePath(d.Name)); err != nil {
				t.Errorf("node: %v", err)
			}
		}
	}
	if found != n {
		t.Errorf("list found %d of %d devices", found, n)
	}
	for i, name := range names {
		if err := c.Remove(context.Background(), name, RemoveOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := c.DeleteThin(pool.Name, uint32(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := c.PoolStatus(pool.Name); err != nil || st.UsedDataBlocks != 0 {
		t.Errorf("pool after 500 deletes: %+v %v", st, err)
	}
	if left := diff(dmNames(t, c), []string{pool.Name}); slices.ContainsFunc(left, func(s string) bool { return strings.HasPrefix(s, prefix) }) {
		t.Errorf("devices left: %v", left)
	}
}

// TestIntegrationConcurrent uses one client from many goroutines.
func TestIntegrationConcurrent(t *testing.T) {
	c := requireDM(t)
	pool := newLoopPool(t, c)
	const workers, rounds = 8, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			name := devName(fmt.Sprintf("conc%d", w))
			for r := range rounds {
				id := uint32(1000 + w*rounds + r)
				tg, _ := ThinTable(thinSectors, pool.DevicePath, id, "")
				for _, step := range []func() error{
					func() error { return c.CreateThin(pool.Name, id) },
					func() error { return c.Create(name, []Target{tg}, CreateOptions{}) },
					func() error { _, err := c.ThinStatus(name); return err },
					func() error { _, err := c.List(); return err },
					func() error { return c.Remove(context.Background(), name, RemoveOptions{}) },
					func() error { return c.DeleteThin(pool.Name, id) },
				} {
					if err := step(); err != nil {
						errs <- err
						_ = c.Remove(context.Background(), name, RemoveOptions{})
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestIntegrationUdevModeNodes forces udev mode on a machine without udev:
// the client then makes the symlink udev would make and never waits.
func TestIntegrationUdevModeNodes(t *testing.T) {
	requireDM(t)
	c, err := Open(withUdev(udevOn), withDevDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if !c.udev {
		t.Fatal("UdevOn not honoured")
	}
	name := devName("udev")
	if err := c.Create(name, []Target{{Length: 8, Type: "error"}}, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, name) })
	info, err := c.Info(name)
	if err != nil {
		t.Fatal(err)
	}
	link, err := os.Readlink(c.DevicePath(name))
	if err != nil || link != "/dev/dm-"+strconv.FormatUint(uint64(info.Minor), 10) {
		t.Fatalf("node %s: link %q, %v", c.DevicePath(name), link, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(c.DevicePath(name), &st); err != nil || st.Rdev != unix.Mkdev(info.Major, info.Minor) {
		t.Errorf("symlink target: %v rdev %d:%d want %d:%d", err, unix.Major(st.Rdev), unix.Minor(st.Rdev), info.Major, info.Minor)
	}
	if err := c.Remove(context.Background(), name, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(c.DevicePath(name)); !os.IsNotExist(err) {
		t.Errorf("symlink left: %v", err)
	}
}
