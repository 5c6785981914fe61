package e2e

import (
	"os"
	"path/filepath"
	"slices"
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
	devs := thinDevices(t, dm, s.pool, tl.thinLs)
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
