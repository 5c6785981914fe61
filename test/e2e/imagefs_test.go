package e2e

// The image filesystem the kubelet sees: with thin as CRI's snapshotter,
// what cAdvisor's own code reports for the mount point CRI names is the
// pool, as containers fill and empty it, as images come and go, as the
// pool grows and across a daemon restart; and the kubelet's image garbage
// collection rule, run on those numbers against CRI, brings the pool's free
// space back.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/internal/cadvisortest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

const (
	mib = 1 << 20
	// The pool: small, so that a container and images fill it quickly.
	// It grows ahead of the writers, in steps larger than the 12 MiB a
	// container leaves free, up to max_data_size; once it cannot grow,
	// the images take the kubelet's usage past its image GC threshold.
	imageFSPool     = 128 * mib
	imageFSMaxPool  = 160 * mib
	imageFSMinFree  = 5
	imageFSSettings = `[pool]
data_size = '128MiB'
max_data_size = '160MiB'
grow_step = '16MiB'
grow_host_reserve = '64MiB'
metadata_size = '64MiB'
min_free_data = 5

[snapshot]
base_size = '256MiB'
fs_type = 'ext4'
`
	// maxFillers bounds the filler images gcRoundTrip pulls, each at most
	// maxFiller bytes; fillAvailable is the share of the capacity they
	// leave available: past the GC threshold (15%), short of the space
	// min_free_data keeps.
	maxFillers    = 8
	maxFiller     = 48 * mib
	fillAvailable = 0.12
	// The kubelet's defaults: imageGCHighThresholdPercent and
	// imageGCLowThresholdPercent.
	gcHigh, gcLow = 85, 80
)

// thinStatus is what `thin-snapshotter status --json` says of the pool's
// data space and of the image filesystem.
type thinStatus struct {
	Data struct {
		Used  json.Number `json:"used_bytes"`
		Total json.Number `json:"total_bytes"`
		Block json.Number `json:"block_size_bytes"`
	} `json:"data"`
	ImageFS struct {
		Dir      string `json:"dir"`
		Mirrored bool   `json:"mirrored"`
		Error    string `json:"error"`
	} `json:"image_fs"`
}

// poolSpace is the pool's data space from the daemon's status: total and
// used bytes, and what the kubelet should see available (the free blocks
// less the ones min_free_data keeps, computed here on its own).
func (s *stack) poolSpace() (total, used, available uint64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.tl.thin, "status", "--json", "--address", s.thinSock).Output()
	if err != nil {
		return 0, 0, 0, fmt.Errorf("thin-snapshotter status: %w\n%s", err, out)
	}
	var st thinStatus
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, 0, 0, fmt.Errorf("thin-snapshotter status --json: %w\n%s", err, out)
	}
	if !st.ImageFS.Mirrored || st.ImageFS.Error != "" || st.ImageFS.Dir != imagefs.Dir(s.thinRoot) {
		return 0, 0, 0, fmt.Errorf("the daemon's image filesystem: %+v", st.ImageFS)
	}
	var bs uint64
	for _, f := range []struct {
		n  json.Number
		to *uint64
	}{{st.Data.Total, &total}, {st.Data.Used, &used}, {st.Data.Block, &bs}} {
		if *f.to, err = strconv.ParseUint(f.n.String(), 10, 64); err != nil {
			return 0, 0, 0, fmt.Errorf("thin-snapshotter status --json: %w", err)
		}
	}
	if bs == 0 {
		return 0, 0, 0, fmt.Errorf("thin-snapshotter status --json: no block size\n%s", out)
	}
	blocks, free := total/bs, (total-min(used, total))/bs
	kept := uint64(math.Ceil(float64(blocks) * imageFSMinFree / 100))
	return total, used, (free - min(free, kept)) * bs, nil
}

// kubelet compares what cAdvisor reports for the mount point CRI names
// with the pool.
type kubelet struct {
	t     *testing.T
	s     *stack
	k     *cadvisortest.Kubelet
	mount string
}

func (k *kubelet) sample() cadvisortest.Sample {
	k.t.Helper()
	x, err := k.k.Sample(k.mount, k.s.poolSpace)
	if err != nil {
		k.t.Fatal(err)
	}
	return x
}

// follow runs act, which changes the pool until changed holds, and waits
// until cAdvisor is within 1% of the changed pool: at most 10 s later. It
// returns how long act took and then the pool's change took to show.
func (k *kubelet) follow(what string, act func(), changed func(cadvisortest.Sample) bool) cadvisortest.Sample {
	k.t.Helper()
	w, err := k.k.Watch(k.mount, k.s.poolSpace)
	if err != nil {
		k.t.Fatal(err)
	}
	start := time.Now()
	act()
	acted := time.Since(start)
	x, lag, err := w.Until(changed, 3*time.Minute)
	if err != nil {
		k.t.Fatalf("%s: %v", what, err)
	}
	k.t.Logf("%s (took %s, in all %s): cAdvisor within 1%% of the changed pool %s later: %s", what, acted.Round(time.Millisecond),
		time.Since(start).Round(time.Millisecond), lag.Round(time.Millisecond), x)
	if lag > 10*time.Second {
		k.t.Errorf("%s: cAdvisor followed the pool %s later, want within 10 s", what, lag)
	}
	return x
}

// settled checks, once the pool has not changed for two of the daemon's
// updates (every 2 s), that cAdvisor has the pool's numbers to the byte.
func (k *kubelet) settled(what string) cadvisortest.Sample {
	k.t.Helper()
	x, err := k.k.Settled(k.mount, k.s.poolSpace, 5*time.Second, 2*time.Minute)
	if err != nil {
		k.t.Fatalf("%s: %v", what, err)
	}
	k.t.Logf("%s: %s", what, x)
	if x.Capacity != x.Total || x.Available != x.WantAvail {
		k.t.Errorf("%s: cAdvisor does not report the pool: %s", what, x)
	}
	return x
}

// imageGC is the kubelet's image GC decision (image_gc_manager.go) on the
// image filesystem's capacity and available bytes: the usage in percent,
// and the bytes to free when it is at or over the high threshold.
func imageGC(capacity, available int64) (usage int, amountToFree int64) {
	available = min(available, capacity)
	usage = 100 - int(available*100/capacity)
	if usage < gcHigh {
		return usage, 0
	}
	return usage, capacity*(100-gcLow)/100 - available
}

func TestImageGCRule(t *testing.T) {
	for _, tc := range []struct {
		capacity, available int64
		usage               int
		free                int64
	}{
		{1000, 500, 50, 0},
		{1000, 151, 85, 49},
		{1000, 150, 85, 50},
		{1000, 160, 84, 0},
		{1000, 0, 100, 200},
		{1000, 2000, 0, 0},
	} {
		if u, f := imageGC(tc.capacity, tc.available); u != tc.usage || f != tc.free {
			t.Errorf("imageGC(%d, %d) = %d%%, %d; want %d%%, %d", tc.capacity, tc.available, u, f, tc.usage, tc.free)
		}
	}
}

// criImage is an image as `crictl images -o json` lists it.
type criImage struct {
	ID       string   `json:"id"`
	RepoTags []string `json:"repoTags"`
	Size     string   `json:"size"`
	Pinned   bool     `json:"pinned"`
}

func criImages(t *testing.T, c *crictl) []criImage {
	t.Helper()
	var out struct {
		Images []criImage `json:"images"`
	}
	decodeJSON(t, "crictl images", c.must(time.Minute, "images", "-o", "json"), &out)
	return out.Images
}

// imageFsInfo is the first image filesystem CRI reports: the one the
// kubelet reads.
func imageFsInfo(t *testing.T, c *crictl) fsUsage {
	t.Helper()
	var info struct {
		Status struct {
			ImageFilesystems []fsUsage `json:"imageFilesystems"`
		} `json:"status"`
	}
	decodeJSON(t, "crictl imagefsinfo", c.must(time.Minute, "imagefsinfo", "-o", "json"), &info)
	if len(info.Status.ImageFilesystems) == 0 {
		t.Fatal("crictl imagefsinfo reports no image filesystem")
	}
	return info.Status.ImageFilesystems[0]
}

// fillerImage is one layer holding one incompressible file of size bytes.
func fillerImage(seed uint64, size int64) imagegen.Image {
	return imagegen.Image{Layers: []imagegen.Layer{{Comment: "filler", Entries: []imagegen.Entry{
		imagegen.Dir("fill", 0o755),
		{Path: "fill/blob", Type: '0', Mode: 0o644, Size: size, Content: func() io.Reader { return imagegen.PseudoRandom(seed, size) }},
	}}}}
}

// startPod runs a pod with one container of image and returns their ids.
func startPod(t *testing.T, c *crictl, dir, name, image string, v criVariant) (string, string) {
	t.Helper()
	pod := podConfig(t, dir, name, v)
	podID := strings.TrimSpace(c.must(15*time.Minute, "runp", pod))
	ctr := strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podID, containerConfig(t, dir, name, 0, image), pod))
	c.must(15*time.Minute, "start", ctr)
	return podID, ctr
}

// fill makes container ctr write n MiB to its root, 4 MiB at a time.
func fill(c *crictl, ctr string, n uint64) {
	c.must(15*time.Minute, "exec", "-s", ctr, "/bin/sh", "-c",
		fmt.Sprintf("dd if=/dev/zero of=/fill bs=4M count=%d conv=fsync 2>&1", (n+3)/4))
}

// removePod stops and removes a pod and its container, as the kubelet
// does: containerd removes the container's snapshot.
func removePod(c *crictl, podID, ctr string) {
	c.stop(ctr)
	c.must(5*time.Minute, "rm", ctr)
	c.must(5*time.Minute, "stopp", podID)
	c.must(5*time.Minute, "rmp", podID)
}

func TestCRIImageFS(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	ct := findCRITools(t)
	reg := startRegistry(t, ct.crane)
	pauseRef := pushPause(t, reg, tl.busybox)

	v := criVariant{name: "imagefs", fsType: "ext4", baseSize: 256 * mib, contrib: "config-v3.toml", allThin: true, thin: imageFSSettings}
	s, c, dir := startCRI(t, tl, ct, reg, v, pauseRef)

	// CRI names the mirror; a kubelet started now (after containerd, as
	// the units order them) finds it among its mounts.
	first := imageFsInfo(t, c)
	if first.FsID.Mountpoint != imagefs.Dir(s.thinRoot) {
		t.Fatalf("crictl imagefsinfo names %q, want the mirror %s", first.FsID.Mountpoint, imagefs.Dir(s.thinRoot))
	}
	k0, err := cadvisortest.Start()
	if err != nil {
		t.Fatal(err)
	}
	kl := &kubelet{t: t, s: s, k: k0, mount: first.FsID.Mountpoint}
	if start := kl.settled("at start"); start.Capacity != imageFSPool {
		t.Errorf("capacity %d, want the pool's %d", start.Capacity, imageFSPool)
	}

	// A container fills the pool close to full: the pool grows ahead of
	// it, and cAdvisor's capacity with it. Then the container goes.
	podID, ctr := startPod(t, c, dir, "fill", pauseRef, v)
	used := kl.settled("a container started").Used
	n := (imageFSPool - 12*mib - used) / mib
	kl.follow(fmt.Sprintf("a container wrote %d MiB, the pool grew", n), func() { fill(c, ctr, n) },
		func(x cadvisortest.Sample) bool { return x.Total > imageFSPool && x.Used >= used+(n-8)*mib })
	if g := kl.settled("grown"); g.Capacity <= imageFSPool || g.Capacity > imageFSMaxPool {
		t.Errorf("capacity %d after growth, want above %d and at most %d", g.Capacity, imageFSPool, imageFSMaxPool)
	}
	kl.follow("the container removed", func() { removePod(c, podID, ctr) },
		func(x cadvisortest.Sample) bool { return x.Used < used+n*mib/2 })
	kl.settled("the container removed")

	gcRoundTrip(t, c, kl, reg)
	restartThin(t, s, c, kl)
}

// gcRoundTrip pulls filler images, one at a time, until the kubelet's
// usage is over the GC threshold (the pool may grow meanwhile, up to
// max_data_size), then frees space as the kubelet's image GC would: it
// removes unused images, oldest first, until their sizes add up to what
// the rule asks, and the pool's free space comes back.
func gcRoundTrip(t *testing.T, c *crictl, kl *kubelet, reg *registry) {
	full := kl.sample()
	usage, amount := imageGC(int64(full.Capacity), int64(full.Available))
	var refs []string
	for i := 0; usage < gcHigh; i++ {
		if i == maxFillers {
			t.Fatalf("usage %d%% after %d filler images: under the %d%% threshold, no GC", usage, i, gcHigh)
		}
		want := uint64(fillAvailable * float64(full.Capacity))
		if full.Available <= want+mib {
			t.Fatalf("usage %d%% with %d bytes available: the fillers cannot take it past %d%%", usage, full.Available, gcHigh)
		}
		size := min(full.Available-want, maxFiller)
		ref, _ := reg.push(t, fillerImage(uint64(0x66696c6c+i), int64(size)), fmt.Sprintf("thin/filler:%d", i))
		refs = append(refs, ref)
		before := full.Used
		kl.follow(fmt.Sprintf("filler %d (%.1f MiB) pulled", i, float64(size)/mib), func() { c.must(15*time.Minute, "pull", ref) },
			func(x cadvisortest.Sample) bool { return x.Used >= before+size*9/10 })
		full = kl.settled(fmt.Sprintf("filler %d pulled", i))
		usage, amount = imageGC(int64(full.Capacity), int64(full.Available))
	}
	t.Logf("image GC: usage %d%% of the image filesystem, %d bytes to free down to %d%%", usage, amount, gcLow)
	// Unused and not pinned, in the order they came (the kubelet's
	// least recently used first).
	byRef := map[string]criImage{}
	for _, img := range criImages(t, c) {
		for _, tag := range img.RepoTags {
			byRef[tag] = img
		}
	}
	var freed int64
	var removed []string
	gc := func() {
		for _, ref := range refs {
			img, ok := byRef[ref]
			if !ok || img.Pinned {
				t.Fatalf("filler %s: %+v (listed %v)", ref, img, ok)
			}
			if freed >= amount {
				break
			}
			size, err := strconv.ParseInt(img.Size, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			c.must(5*time.Minute, "rmi", img.ID)
			freed += size
			removed = append(removed, ref)
		}
	}
	start := time.Now()
	// The pool gives back at least most of what the images' sizes say.
	kl.follow("image GC", gc, func(x cadvisortest.Sample) bool { return x.Used+uint64(amount)*9/10 <= full.Used })
	took := time.Since(start)
	after := kl.settled("after GC")
	usageAfter, _ := imageGC(int64(after.Capacity), int64(after.Available))
	t.Logf("image GC round trip: %d images removed for %.1f MiB asked (%.1f MiB by their sizes), %.1f MiB given back to the pool, usage %d%% -> %d%%, in %s",
		len(removed), float64(amount)/mib, float64(freed)/mib, float64(full.Used-after.Used)/mib, usage, usageAfter, took.Round(time.Millisecond))
	if usageAfter > gcLow {
		t.Errorf("after GC the usage is %d%%, want at most %d%%", usageAfter, gcLow)
	}
}

// restartThin restarts the daemon under a running containerd and kubelet:
// the mirror keeps its device, and cAdvisor, from the mounts it listed
// before, still reports the pool; CRI's imagefsinfo still answers, its
// used bytes containerd's own figure.
func restartThin(t *testing.T, s *stack, c *crictl, kl *kubelet) {
	before := kl.settled("before the restart")
	if err := s.thin.Stop(time.Minute); err != nil {
		t.Fatalf("stopping thin-snapshotter: %v", err)
	}
	s.startThin("thin-restarted.log")
	after := kl.settled("after the restart")
	if after.Major != before.Major || after.Minor != before.Minor {
		t.Errorf("the mirror is device %d:%d after the restart, %d:%d before", after.Major, after.Minor, before.Major, before.Minor)
	}
	// used_bytes is the sum of thin's snapshot usage (CRI refreshes it
	// every 10 s), not what statfs of the mirror counts as used.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(2 * time.Second) {
		fs := imageFsInfo(t, c)
		used, snaps := fs.UsedBytes.n(), s.snapshotsUsage(t)
		if fs.FsID.Mountpoint == kl.mount && used == snaps && used > 0 {
			t.Logf("crictl imagefsinfo after the restart: %s, %d bytes used, the snapshots' usage; statfs of the mirror counts %d used",
				fs.FsID.Mountpoint, used, after.Capacity-after.Free)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("crictl imagefsinfo after the restart: %+v; thin's snapshots use %d bytes", fs, snaps)
		}
	}
}

// snapshotsUsage adds up the usage of thin's snapshots in the stack's
// namespace, as ctr reports it.
func (s *stack) snapshotsUsage(t *testing.T) uint64 {
	t.Helper()
	out := s.mustCtr(time.Minute, "snapshots", "--snapshotter", "thin", "usage", "-b")
	var sum uint64
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) == 0 {
			continue // the header
		}
		n, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil || len(f) != 3 {
			t.Fatalf("ctr snapshots usage: line %q", line)
		}
		sum += n
	}
	return sum
}
