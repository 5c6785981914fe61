package snapshotter

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
)

// stepLog records the steps a StepObserver sees.
type stepLog struct {
	mu    sync.Mutex
	steps []string
}

func (l *stepLog) ObserveStep(step Step, _ time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := string(step)
	if err != nil {
		s += "!"
	}
	l.steps = append(l.steps, s)
}

func TestStatusAndDevices(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool, func(c *Config) {
		c.BlockSize = 64 << 10
		c.MinFreeData, c.MinFreeMetadata = 5, 10
	})
	stopWorker(s) // only Drain finishes removals
	log := &stepLog{}
	s.SetStepObserver(log)

	mustLayer(ctx, t, s, "c", "a", "")
	if _, err := s.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "b", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "gone", "c"); err != nil {
		t.Fatal(err)
	}
	pool.write("tp-snap-"+itoa(idOf(t, s, "b")), 8)
	pool.setOpen("tp-snap-"+itoa(idOf(t, s, "b")), 1)
	s.cfg.AsyncRemove = true
	goneID := idOf(t, s, "gone")
	if err := s.Remove(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	pool.mu.Lock()
	pool.status = dmsetup.PoolStatus{UsedDataBlocks: 10, TotalDataBlocks: 100, UsedMetaBlocks: 3, TotalMetaBlocks: 50,
		Mode: dmsetup.PoolModeRW, MetadataLowWatermark: 47, HasMetadataLowWatermark: true}
	pool.mu.Unlock()

	st, err := s.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{KindActive: 1, KindView: 1, KindCommitted: 1}
	for k, n := range want {
		if st.Snapshots[k] != n {
			t.Errorf("Snapshots[%s] = %d, want %d (%v)", k, st.Snapshots[k], n, st.Snapshots)
		}
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"Pool", st.Pool, "tp"},
		{"Mode", st.Mode, ModeRW},
		{"DataUsed", st.DataUsed, uint64(10 * 64 << 10)},
		{"DataTotal", st.DataTotal, uint64(100 * 64 << 10)},
		{"MetadataUsed", st.MetadataUsed, uint64(3 * 4096)},
		{"MetadataTotal", st.MetadataTotal, uint64(50 * 4096)},
		{"MetadataLowWater", st.MetadataLowWater, true},
		{"DataLowWater", st.DataLowWater, false},
		{"PendingJournal", st.PendingJournal, 1},
		{"PendingRemovals", st.PendingRemovals, 1},
		{"ActiveDevices", st.ActiveDevices, 3}, // b (a's, warm after the commit), c's (v's), and gone's until removed
		{"MinFreeData", st.MinFreeData, 5.0},
		{"PoolTransactionID", st.PoolTransactionID, pool.txid},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}

	devs, err := s.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range devs {
		got = append(got, strings.Join([]string{d.Key, d.Kind, d.State, boolStr(d.Active, "active"), itoa(uint32(d.OpenCount)), itoa(d.MappedBytes / 512)}, "/"))
		if d.Name != s.deviceName(d.ID) {
			t.Errorf("device %d named %s", d.ID, d.Name)
		}
		if d.Kind != "" && d.VirtualSize != 64<<20 {
			t.Errorf("device %d virtual size %d", d.ID, d.VirtualSize)
		}
	}
	// b took a's device, warm after its commit; c got a new one.
	// v shares c's device: c's is active, v has none of its own.
	wantDevs := []string{
		"/base/ready/-/0/0", "b/active/ready/active/1/8", "c/committed/ready/active/0/0",
		"//removing/active/0/0",
	}
	if strings.Join(got, " ") != strings.Join(wantDevs, " ") {
		t.Errorf("Devices:\n got %v\nwant %v", got, wantDevs)
	}
	if devs[len(devs)-1].ID != goneID {
		t.Errorf("last device is %d, want the pending removal %d", devs[len(devs)-1].ID, goneID)
	}

	if err := s.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err = s.Status(ctx); err != nil || st.PendingRemovals != 0 || st.ActiveDevices != 2 {
		t.Errorf("after Drain: %d pending removals, %d devices, %v", st.PendingRemovals, st.ActiveDevices, err)
	}

	// a: snap+activate; commit c: snap; v: c's device activated; b: the
	// warm device, no step; gone: snap+activate; Drain: deactivate+delete.
	wantSteps := "create_snap activate, create_snap, activate, create_snap activate, deactivate delete"
	if g := strings.Join(log.steps, " "); g != strings.ReplaceAll(wantSteps, ",", "") {
		t.Errorf("steps:\n got %s\nwant %s", g, wantSteps)
	}
}

func TestPoolMode(t *testing.T) {
	for _, c := range []struct {
		st   dmsetup.PoolStatus
		want string
	}{
		{dmsetup.PoolStatus{Mode: dmsetup.PoolModeRW}, ModeRW},
		{dmsetup.PoolStatus{Mode: dmsetup.PoolModeRO}, ModeRO},
		{dmsetup.PoolStatus{Mode: dmsetup.PoolModeOutOfDataSpace}, ModeOutOfDataSpace},
		{dmsetup.PoolStatus{Mode: dmsetup.PoolModeRO, NeedsCheck: true}, ModeNeedsCheck},
		{dmsetup.PoolStatus{Fail: true}, ModeFail},
		{dmsetup.PoolStatus{Error: true}, ModeFail},
	} {
		if got := poolMode(c.st); got != c.want {
			t.Errorf("poolMode(%+v) = %s, want %s", c.st, got, c.want)
		}
	}
}

func TestRecoveryCounts(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	pool := newFakePool("tp")
	s := mustNewUnclosed(t, root, pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	// A crash in the middle of a prepare: its create is rolled back.
	pool.hook = func(op string) error {
		if op == "activate" {
			panic(crash{})
		}
		return nil
	}
	func() {
		defer func() { _ = recover() }()
		_, _ = s.Prepare(ctx, "b", "")
	}()
	pool.hook = nil
	s.stopBackground()
	s.db.Close()
	// And a reboot: a's device is gone.
	pool.mu.Lock()
	for name := range pool.devices {
		delete(pool.devices, name)
	}
	pool.mu.Unlock()

	s2 := mustNew(t, root, pool)
	st, err := s2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := st.LastRecovery
	if r.RolledBackCreates != 1 || r.ReactivatedDevices != 1 || r.FinishedRemovals != 0 {
		t.Errorf("LastRecovery = %+v, want 1 rolled back create and 1 reactivated device", r)
	}
}

// CheckOnline leaves out what a concurrent operation explains: a finding
// that is gone on the second pass.
func TestCheckOnline(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	r, err := s.CheckOnline(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean || !r.Online {
		t.Fatalf("clean pool: %+v", r)
	}
	// An orphan that stays: reported.
	pool.mu.Lock()
	pool.thins[99] = 0
	pool.mu.Unlock()
	if r, err = s.CheckOnline(ctx); err != nil {
		t.Fatal(err)
	}
	if got := summary(r.Findings); strings.Join(got, " ") != "orphan  99" || r.Clean {
		t.Fatalf("persistent orphan: findings %v clean %v", got, r.Clean)
	}
	// A device that disappears between the passes (a Remove finishing):
	// not reported. The first pass sees tp-snap-77 as stale; it is gone
	// when the second reads the pool's status.
	pool.mu.Lock()
	pool.devices["tp-snap-77"] = &fakeDev{id: 77}
	passes := 0
	pool.hook = func(op string) error {
		if op == "status" {
			passes++
			if passes == 2 {
				pool.mu.Lock()
				delete(pool.devices, "tp-snap-77")
				pool.mu.Unlock()
			}
		}
		return nil
	}
	pool.mu.Unlock()
	if r, err = s.CheckOnline(ctx); err != nil {
		t.Fatal(err)
	}
	pool.hook = nil
	if passes != 2 {
		t.Fatalf("%d passes, want 2", passes)
	}
	if got := summary(r.Findings); strings.Join(got, " ") != "orphan  99" {
		t.Fatalf("transient stale device: findings %v, want only the orphan", got)
	}
}

func idOf(t *testing.T, s *Snapshotter, key string) uint32 {
	t.Helper()
	snap, err := s.ready(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return snap.DeviceID
}

func itoa[T uint32 | uint64](n T) string { return strconv.FormatUint(uint64(n), 10) }

func boolStr(b bool, s string) string {
	if b {
		return s
	}
	return "-"
}

// TestStatusWarm: warm devices are counted apart from the journal's
// operations and listed by Devices with their layer.
func TestStatusWarm(t *testing.T) {
	ctx := context.Background()
	pool := newFakePool("tp")
	s := mustNew(t, t.TempDir(), pool)
	mustLayer(ctx, t, s, "c", "a", "")
	st, err := s.Status(ctx)
	if err != nil || st.WarmDevices != 1 || st.PendingJournal != 0 {
		t.Fatalf("status: %d warm, %d pending, %v", st.WarmDevices, st.PendingJournal, err)
	}
	devs, err := s.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var warm []string
	for _, d := range devs {
		if d.State == DeviceWarm {
			warm = append(warm, d.Key+"/"+boolStr(d.Active, "active"))
		}
	}
	if strings.Join(warm, " ") != "c/active" {
		t.Errorf("warm devices listed: %v", warm)
	}
	if r, err := s.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("online check with a warm device: %+v, %v", r, err)
	}
}
