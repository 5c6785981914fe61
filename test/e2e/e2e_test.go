package e2e

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

func TestEndToEnd(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	tStart := time.Now()
	s := startStack(t, tl)

	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()

	var snapshotterLines []string
	for l := range strings.SplitSeq(s.mustCtr(time.Minute, "plugins", "ls"), "\n") {
		if strings.HasPrefix(l, "io.containerd.snapshotter.v1 ") {
			snapshotterLines = append(snapshotterLines, l)
		}
	}
	t.Logf("ctr plugins ls (snapshotters):\n%s", strings.Join(snapshotterLines, "\n"))
	if !slices.ContainsFunc(snapshotterLines, func(l string) bool {
		f := strings.Fields(l)
		return len(f) >= 4 && f[1] == "thin" && f[len(f)-1] == "ok"
	}) {
		t.Fatal("containerd does not list the thin snapshotter as ok")
	}
	ids := thinDevices(t, dm, s.pool, tl.thinLs)
	t.Logf("pool %s after start: %d thin device(s) %v", s.pool, len(ids), ids)
	if len(ids) != 1 {
		t.Fatalf("a fresh pool should hold only the base device, holds %v", ids)
	}
	baseID := ids[0]
	usedAtStart := usedDataBlocks(t, dm, s.pool)

	// The image.
	start := time.Now()
	img, expect := e2eImage(t, tl.busybox)
	tarPath := filepath.Join(s.dir, "image.tar")
	f, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	res, err := imagegen.Write(f, s.dir, img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("generated %s: %d layers, %d MiB, manifest %s, in %s", imageRef, len(res.Layers), st.Size()>>20,
		res.Manifest.Digest, time.Since(start).Round(time.Millisecond))

	// The VM is 5-20x slower than a real machine, and by varying amounts:
	// the same import into overlayfs in the same run is the yardstick.
	// Image and content are removed again so both imports start empty.
	start = time.Now()
	s.mustCtr(15*time.Minute, "images", "import", "--snapshotter", "overlayfs", tarPath)
	tOverlay := time.Since(start)
	s.mustCtr(5*time.Minute, "images", "rm", "--sync", imageRef)
	if out := s.mustCtr(time.Minute, "content", "ls", "-q"); strings.TrimSpace(out) != "" {
		t.Fatalf("content left after removing the overlayfs import:\n%s", out)
	}

	start = time.Now()
	out := s.mustCtr(15*time.Minute, "images", "import", "--snapshotter", "thin", tarPath)
	tImport := time.Since(start)
	t.Logf("ctr images import --snapshotter thin: %s (overlayfs in this VM: %s, ratio %.2f)\n%s", tImport.Round(time.Millisecond),
		tOverlay.Round(time.Millisecond), tImport.Seconds()/tOverlay.Seconds(), out)
	out = s.mustCtr(time.Minute, "images", "ls", "-q")
	if !slices.Contains(strings.Fields(out), imageRef) {
		t.Fatalf("ctr images ls does not list %s:\n%s", imageRef, out)
	}

	// Every layer is a committed snapshot keyed by its chain ID, on its
	// parent layer.
	rows := s.listSnapshots()
	t.Logf("ctr snapshots --snapshotter thin ls after import:\n%s", formatRows(rows))
	var want []snapRow
	for i, c := range res.ChainIDs {
		r := snapRow{key: c.String(), kind: "Committed"}
		if i > 0 {
			r.parent = res.ChainIDs[i-1].String()
		}
		want = append(want, r)
	}
	if !sameRows(rows, want) {
		t.Fatalf("snapshots after import:\n%s\nwant:\n%s", formatRows(rows), formatRows(want))
	}
	ids = s.settledDevices(dm, 1+len(res.Layers))
	t.Logf("pool after import: %d thin devices %v; active: %v; %d data blocks used (%d after start)",
		len(ids), ids, activeThins(t, dm, s.pool), usedDataBlocks(t, dm, s.pool), usedAtStart)
	if len(ids) != 1+len(res.Layers) {
		t.Errorf("pool holds %d thin devices after import, want base + %d layers", len(ids), len(res.Layers))
	}
	if a := activeThins(t, dm, s.pool); len(a) != 0 {
		t.Errorf("committed layers must not stay active, active: %v", a)
	}

	// containerd asks for usage (CRI does, every 10 s): the large file's
	// layer accounts for at least the file.
	sctx, sn := snapshotsClient(t, s.ctrdSock, s.ns)
	for i, c := range res.ChainIDs {
		u, err := sn.Usage(sctx, c.String())
		if err != nil {
			t.Errorf("usage of layer %d: %v", i, err)
			continue
		}
		t.Logf("usage of layer %d (%s): %d bytes, %d inodes", i, img.Layers[i].Comment, u.Size, u.Inodes)
		if i == 1 && u.Size < bigSize {
			t.Errorf("usage of the large file's layer: %d bytes, want at least %d", u.Size, bigSize)
		}
	}

	// Mounts of a committed layer is an error, not a half-made mount.
	if m, err := sn.Mounts(sctx, res.ChainIDs[0].String()); err == nil {
		t.Errorf("Mounts of a committed layer returned %+v and no error", m)
	}

	// A restarted thin-snapshotter takes its pool and snapshots back,
	// containerd reconnects, and a running container does not notice.
	top := res.ChainIDs[len(res.ChainIDs)-1].String()
	s.mustCtr(10*time.Minute, "run", "-d", "--snapshotter", "thin", imageRef, "e2e-sleeper", "/bin/sleep", "3600")
	if err := s.thin.Stop(time.Minute); err != nil {
		t.Fatalf("stopping thin-snapshotter: %v", err)
	}
	s.check("with the image and a running container")
	s.startThin("thin-restarted.log")
	withSleeper := append(slices.Clone(want), snapRow{key: "e2e-sleeper", parent: top, kind: "Active"})
	if rows := s.listSnapshotsRetry(); !sameRows(rows, withSleeper) {
		t.Fatalf("snapshots after a thin-snapshotter restart:\n%s\nwant:\n%s", formatRows(rows), formatRows(withSleeper))
	}
	out = s.mustCtr(5*time.Minute, "tasks", "exec", "--exec-id", "probe", "e2e-sleeper",
		"/bin/sh", "-c", "echo alive > /alive && sync && cat /alive")
	if strings.TrimSpace(out) != "alive" {
		t.Errorf("the running container after the restart: %q, want alive", out)
	} else {
		t.Logf("container e2e-sleeper ran across the thin-snapshotter restart and still writes to its device")
	}
	s.mustCtr(5*time.Minute, "tasks", "rm", "--force", "e2e-sleeper")
	s.mustCtr(5*time.Minute, "containers", "rm", "e2e-sleeper")
	if rows := s.listSnapshots(); !sameRows(rows, want) {
		t.Fatalf("snapshots after removing the container:\n%s\nwant:\n%s", formatRows(rows), formatRows(want))
	}

	// What tar and the container cannot show: xattrs and ownership, seen
	// through a read-only view of the top layer mounted here.
	mounts, err := sn.View(sctx, "e2e-inspect", res.ChainIDs[len(res.ChainIDs)-1].String(),
		snapshots.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)}))
	if err != nil {
		t.Fatalf("view of the top layer: %v", err)
	}
	t.Logf("view mounts: %+v", mounts)
	if len(mounts) != 1 || !slices.Contains(mounts[0].Options, "ro") {
		t.Errorf("a view should be one read-only mount, got %+v", mounts)
	}
	withMounted(t, mounts, func(dir string) {
		for _, x := range []struct{ name, want string }{{"user.thin", "e2e-value"}, {"user.other", "42"}} {
			buf := make([]byte, 256)
			n, err := unix.Lgetxattr(filepath.Join(dir, "xattr/file"), x.name, buf)
			if err != nil {
				t.Errorf("xattr %s of /xattr/file: %v", x.name, err)
				continue
			}
			if got := string(buf[:n]); got != x.want {
				t.Errorf("xattr %s of /xattr/file = %q, want %q", x.name, got, x.want)
			}
		}
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(dir, "perm/file"), &st); err != nil {
			t.Error(err)
		} else if st.Uid != 1000 || st.Gid != 1000 || st.Mode&0o7777 != 0o640 {
			t.Errorf("/perm/file: uid %d gid %d mode %o, want 1000 1000 640", st.Uid, st.Gid, st.Mode&0o7777)
		}
		if err := os.WriteFile(filepath.Join(dir, "nope"), nil, 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("writing into a view: %v, want EROFS", err)
		}
	})
	if err := sn.Remove(sctx, "e2e-inspect"); err != nil {
		t.Errorf("remove the view: %v", err)
	}

	// A container sees the merged image and can write.
	start = time.Now()
	out = s.mustCtr(10*time.Minute, "run", "--rm", "--snapshotter", "thin", imageRef, "e2e-check", "/bin/sh", "-c", containerScript)
	tRun := time.Since(start)
	t.Logf("ctr run --rm --snapshotter thin (%s), container output:\n%s", tRun.Round(time.Millisecond), out)
	got := parseKV(out)
	for k, v := range expect {
		if got[k] != v {
			t.Errorf("container: %s = %q, want %q", k, got[k], v)
		}
	}
	root := strings.Fields(got["root"])
	if len(root) != 3 || !isThinNode(s.pool, root[0]) || root[1] != "ext4" ||
		!slices.Contains(strings.Split(root[2], ","), "rw") {
		t.Errorf("container root mount %q: want a rw ext4 /dev/mapper/%s<id>", got["root"], dmsetup.DeviceNamePrefix(s.pool))
	}

	// Containers start side by side: their snapshots are prepared in
	// parallel, each on its own device.
	start = time.Now()
	const parallel = 4
	outs := make([]string, parallel)
	errs := make([]error, parallel)
	var wg sync.WaitGroup
	for i := range parallel {
		wg.Go(func() {
			outs[i], errs[i] = s.ctr(10*time.Minute, "run", "--rm", "--snapshotter", "thin", imageRef, fmt.Sprintf("e2e-par-%d", i),
				"/bin/sh", "-c", fmt.Sprintf("echo %d > /mine && sync && cat /mine /data/keep && awk '$2 == \"/\" { print $1 }' /proc/mounts", i))
		})
	}
	wg.Wait()
	devices := map[string]bool{}
	for i := range parallel {
		f := strings.Fields(outs[i])
		if errs[i] != nil || len(f) != 3 || f[0] != fmt.Sprint(i) || f[1] != "new" {
			t.Errorf("parallel container %d: %q, %v", i, outs[i], errs[i])
			continue
		}
		devices[f[2]] = true
	}
	t.Logf("%d containers side by side in %s on devices %v", parallel, time.Since(start).Round(time.Millisecond), slices.Sorted(maps.Keys(devices)))
	if len(devices) != parallel && !t.Failed() {
		t.Errorf("%d parallel containers shared root devices: %v", parallel, devices)
	}

	// A container kept after its task ends keeps its writes on its thin
	// device.
	start = time.Now()
	out = s.mustCtr(10*time.Minute, "run", "--snapshotter", "thin", imageRef, "e2e-persist", "/bin/sh", "-c", "echo persisted > /persist && sync")
	t.Logf("ctr run e2e-persist (%s): %q", time.Since(start).Round(time.Millisecond), out)
	pm, err := sn.Mounts(sctx, "e2e-persist")
	if err != nil {
		t.Fatalf("mounts of the kept container's snapshot: %v", err)
	}
	withMounted(t, pm, func(dir string) {
		data, err := os.ReadFile(filepath.Join(dir, "persist"))
		if err != nil || string(data) != "persisted\n" {
			t.Errorf("/persist of the kept container: %q, %v", data, err)
		}
	})
	ids = s.settledDevices(dm, 2+len(res.Layers))
	t.Logf("pool with the kept container: %d thin devices %v; active: %v", len(ids), ids, activeThins(t, dm, s.pool))
	if len(ids) != 2+len(res.Layers) {
		t.Errorf("pool holds %d thin devices with one container, want base + %d layers + 1", len(ids), len(res.Layers))
	}

	// Remove the container and the image: containerd's GC removes the
	// snapshots, and the thin devices go with them.
	start = time.Now()
	s.mustCtr(time.Minute, "containers", "rm", "e2e-persist")
	s.mustCtr(5*time.Minute, "images", "rm", "--sync", imageRef)
	var left []snapRow
	for deadline := time.Now().Add(2 * time.Minute); ; {
		left = s.listSnapshots()
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(left) != 0 {
		t.Fatalf("snapshots left 2 min after removing the image and the container:\n%s", formatRows(left))
	}
	// The metadata goes first; the snapshotter's Remove follows.
	for deadline := time.Now().Add(2 * time.Minute); ; {
		ids = thinDevices(t, dm, s.pool, tl.thinLs)
		if len(ids) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	tGC := time.Since(start)
	t.Logf("after removing the image and the container (%s): ctr snapshots ls is empty; pool holds %d thin device(s) %v",
		tGC.Round(time.Millisecond), len(ids), ids)
	if len(ids) != 1 || ids[0] != baseID {
		t.Errorf("pool holds %v after GC, want only the base device %s", ids, baseID)
	}
	if a := activeThins(t, dm, s.pool); len(a) != 0 {
		t.Errorf("active thin devices after GC: %v", a)
	}
	// Deleted thin devices give their blocks back to the pool.
	if used := usedDataBlocks(t, dm, s.pool); used != usedAtStart {
		t.Errorf("pool uses %d data blocks after GC, %d after start", used, usedAtStart)
	} else {
		t.Logf("pool uses %d data blocks after GC, as after start", used)
	}

	// Stop both daemons: thin-snapshotter exits cleanly and leaves only
	// the pool.
	if err := s.ctrd.Stop(time.Minute); err != nil {
		t.Errorf("containerd: %v", err)
	}
	if err := s.thin.Stop(time.Minute); err != nil {
		t.Errorf("thin-snapshotter did not exit cleanly: %v", err)
	}
	s.check("after GC and shutdown")
	devs, err := dm.List()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	t.Logf("dm devices after both daemons stopped: %v", names)
	if len(names) != 1 || names[0] != s.pool {
		t.Errorf("dm devices after stop: %v, want only the pool %s", names, s.pool)
	}
	if err := dmtest.DestroyLoopPool(context.Background(), s.pool, filepath.Join(s.dir, "thin", "pool")); err != nil {
		t.Fatalf("destroy the pool: %v", err)
	}
	s.poolGone = true
	devs, err = dm.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.Name, s.pool) {
			t.Errorf("dm device %s left after the pool was torn down", d.Name)
		}
	}
	t.Logf("timings: import %s (overlayfs %s), run %s, removal+GC %s, total %s",
		tImport.Round(time.Millisecond), tOverlay.Round(time.Millisecond), tRun.Round(time.Millisecond), tGC.Round(time.Millisecond), time.Since(tStart).Round(time.Millisecond))
}
