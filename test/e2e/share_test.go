package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

// TestEndToEndSharedLayers: an image imported in containerd's default
// namespace and again in k8s.io is unpacked once. The second import's
// layer Prepares are answered AlreadyExists (containerd.io/snapshot.ref),
// so the pool gains no device and containerd applies nothing; k8s.io's
// containers run on the shared layers, also after default drops the image.
func TestEndToEndSharedLayers(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	s := startStack(t, tl)
	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()

	bb, err := imagegen.Busybox(tl.busybox)
	if err != nil {
		t.Fatal(err)
	}
	const ref = "docker.io/thin-snapshotter/share:latest"
	img := imagegen.Image{
		Ref: ref,
		Layers: []imagegen.Layer{
			{Entries: bb, Comment: "busybox"},
			{Entries: []imagegen.Entry{imagegen.Dir("data", 0o755), imagegen.File("data/hello", 0o644, "shared layer\n")}, Comment: "data"},
		},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}},
	}
	tarPath := filepath.Join(s.dir, "share.tar")
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
	// ctr takes the last --namespace: k8s runs ctr in k8s.io.
	k8s := func(timeout time.Duration, args ...string) string {
		t.Helper()
		return s.mustCtr(timeout, append([]string{"--namespace", "k8s.io"}, args...)...)
	}

	start := time.Now()
	s.mustCtr(10*time.Minute, "images", "import", "--snapshotter", "thin", tarPath)
	tFirst := time.Since(start)
	devs := s.settledDevices(dm, 1+len(res.Layers))
	if len(devs) != 1+len(res.Layers) {
		t.Fatalf("after the first import the pool holds %v, want the base and %d layers", devs, len(res.Layers))
	}

	start = time.Now()
	k8s(10*time.Minute, "images", "import", "--snapshotter", "thin", tarPath)
	tSecond := time.Since(start)
	t.Logf("import in default: %s; the same image in k8s.io: %s", tFirst.Round(time.Millisecond), tSecond.Round(time.Millisecond))
	if got := thinDevices(t, dm, s.pool, tl.thinLs); !slices.Equal(got, devs) {
		t.Fatalf("the second namespace's import made devices: %v, before %v", got, devs)
	}
	out := k8s(time.Minute, "snapshots", "--snapshotter", "thin", "ls")
	for _, c := range res.ChainIDs {
		if !strings.Contains(out, c.String()) {
			t.Errorf("k8s.io does not list layer %s:\n%s", c, out)
		}
	}
	if out := s.mustCtr(time.Minute, "--namespace", "k8s.io", "images", "ls", "-q"); !strings.Contains(out, ref) {
		t.Fatalf("k8s.io does not list %s:\n%s", ref, out)
	}

	run := func(id string) {
		t.Helper()
		out := k8s(5*time.Minute, "run", "--rm", "--snapshotter", "thin", ref, id, "/bin/cat", "/data/hello")
		if strings.TrimSpace(out) != "shared layer" {
			t.Errorf("container %s printed %q", id, out)
		}
	}
	run("share-1")
	// default lets go of the image: k8s.io's layers stay.
	s.mustCtr(5*time.Minute, "images", "rm", "--sync", ref)
	run("share-2")
	k8s(5*time.Minute, "images", "rm", "--sync", ref)
	deadline := time.Now().Add(time.Minute)
	for {
		got := thinDevices(t, dm, s.pool, tl.thinLs)
		if len(got) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool holds %v after both namespaces removed the image, want the base only", got)
		}
		time.Sleep(time.Second)
	}
}

// TestEndToEndSizeClass: a size class is a second proxy plugin on the same
// daemon. A container run on it with ctr gets the class's disk size on the
// layers the main socket unpacked: ctr's unpack for the class is answered
// from the existing layers (a thin snapshot each), nothing is applied.
func TestEndToEndSizeClass(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	const class, classSize = "thin-1g", 1 << 30
	s := startStackWith(t, tl, stackOptions{
		thinSettings: ctrThinSettings + fmt.Sprintf("\n[[class]]\nname = %q\nsize = %q\n", class, "1GiB"),
		namespace:    namespace,
		containerdConfig: func(s *stack) (string, []string) {
			return fmt.Sprintf(containerdConfig, filepath.Join(s.dir, "containerd", "root"), filepath.Join(s.dir, "containerd", "state"),
				s.ctrdSock, s.thinSock) + fmt.Sprintf("\n[proxy_plugins.%q]\n  type = \"snapshot\"\n  address = %q\n",
				class, filepath.Join(filepath.Dir(s.thinSock), class+".sock")), nil
		},
		cleanup: func(s *stack) {
			_, _ = s.ctr(time.Minute, "tasks", "rm", "--force", "class-1")
			_, _ = s.ctr(time.Minute, "containers", "rm", "class-1")
		},
	})
	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()

	bb, err := imagegen.Busybox(tl.busybox)
	if err != nil {
		t.Fatal(err)
	}
	const ref = "docker.io/thin-snapshotter/class:latest"
	img := imagegen.Image{
		Ref: ref,
		Layers: []imagegen.Layer{
			{Entries: bb, Comment: "busybox"},
			{Entries: []imagegen.Entry{imagegen.Dir("data", 0o755), imagegen.File("data/hello", 0o644, "from the main socket\n")}, Comment: "data"},
		},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}},
	}
	tarPath := filepath.Join(s.dir, "class.tar")
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
	s.mustCtr(10*time.Minute, "images", "import", "--snapshotter", "thin", tarPath)
	devs := s.settledDevices(dm, 1+len(res.Layers))

	// ctr run unpacks the image for the class first: by sharing.
	out := s.mustCtr(5*time.Minute, "run", "--rm", "--snapshotter", class, ref, "class-1",
		"/bin/sh", "-c", "cat /data/hello && df -k / | tail -n 1")
	t.Logf("container on %s:\n%s", class, out)
	if !strings.Contains(out, "from the main socket") {
		t.Errorf("the class container does not see the layer's file:\n%s", out)
	}
	// df's last line: "[device] size used available use% /", the device
	// on a line of its own when its name is long.
	var kb uint64
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if f := strings.Fields(lines[len(lines)-1]); len(f) >= 5 {
		kb, _ = strconv.ParseUint(f[len(f)-5], 10, 64)
	}
	if kb*1024 > classSize || kb*1024 < classSize/100*90 {
		t.Errorf("the class container's / has %d KiB, want about %d", kb, classSize>>10)
	}
	// The class holds the layers as thin snapshots of the main socket's:
	// one device each, no more, once containerd's garbage collection has
	// removed the container's.
	if got := s.settledDevices(dm, len(devs)+len(res.Layers)); len(got) != len(devs)+len(res.Layers) {
		t.Fatalf("pool holds %v after the class run, want %d devices (%d before, one shared snapshot per layer)", got, len(devs)+len(res.Layers), len(devs))
	}
	out = s.mustCtr(time.Minute, "snapshots", "--snapshotter", class, "ls")
	for _, c := range res.ChainIDs {
		if !strings.Contains(out, c.String()) {
			t.Errorf("the class does not list layer %s:\n%s", c, out)
		}
	}
}
