package e2e

// The CRI case: containerd's Kubernetes plugin driven by crictl as a kubelet
// would, with images from a registry served in the VM, pods on CNI bridge
// networking, and containerd configured by contrib/containerd's files.

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

const (
	// criNamespace is where CRI keeps its images, containers and snapshots.
	criNamespace = "k8s.io"
	// criHandler is contrib's runtime handler that runs runc containers on
	// thin devices (the default handler stays on overlayfs).
	criHandler = "runc-thin"
	// contribClass is the size class of contrib/containerd's files (its
	// proxy plugin and runtime handler runc-<class>), as in
	// contrib/config.toml's commented example.
	contribClass = "thin-50g"
	// runtimeHandlerAnnotation names the handler in a pull request's pod
	// config; crictl pull has no other way to pass it.
	runtimeHandlerAnnotation = "io.containerd.cri.runtime-handler"
)

type criTools struct {
	crictl, crane, cniDir string
}

func findCRITools(t *testing.T) criTools {
	dir := os.Getenv("THIN_E2E_CRI_TOOLS")
	if dir == "" {
		dir = filepath.Join(repoRoot(t), ".bench", "cri-tools")
	}
	ct := criTools{crictl: filepath.Join(dir, "crictl"), crane: filepath.Join(dir, "crane"), cniDir: dir}
	for _, p := range []string{ct.crictl, ct.crane, filepath.Join(dir, "bridge"), filepath.Join(dir, "loopback"), filepath.Join(dir, "host-local")} {
		require(t, executable(p), "%s is missing (make test-e2e builds it: test/e2e/ensure-cri-tools)", p)
	}
	return ct
}

// registry is go-containerregistry's in-memory registry (crane registry
// serve) on the loopback interface.
type registry struct {
	addr  string
	crane string
	dir   string
}

func startRegistry(t *testing.T, crane string) *registry {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require(t, err == nil, "no TCP on 127.0.0.1 (is lo up?): %v", err)
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	d := startDaemon(t, "registry", filepath.Join(dir, "registry.log"), nil, crane, "registry", "serve", "--address", addr)
	t.Cleanup(func() {
		if !d.Exited() {
			d.Kill()
		}
	})
	for deadline := time.Now().Add(time.Minute); ; {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if d.Exited() || time.Now().After(deadline) {
			tail(t, d, 20)
			t.Fatalf("registry does not serve %s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &registry{addr: addr, crane: crane, dir: dir}
}

// push writes img as an OCI layout and pushes it as addr/name.
func (r *registry) push(t *testing.T, img imagegen.Image, name string) (string, imagegen.Result) {
	t.Helper()
	ref := r.addr + "/" + name
	img.Ref = ref
	tarPath := filepath.Join(r.dir, strings.NewReplacer("/", "_", ":", "_").Replace(name)+".tar")
	f, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	res, err := imagegen.Write(f, r.dir, img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	layout := strings.TrimSuffix(tarPath, ".tar")
	if err := untar(tarPath, layout); err != nil {
		t.Fatal(err)
	}
	os.Remove(tarPath)
	start := time.Now()
	out, err := exec.Command(r.crane, "push", "--insecure", layout, ref).CombinedOutput()
	if err != nil {
		t.Fatalf("crane push %s: %v\n%s", ref, err, out)
	}
	os.RemoveAll(layout)
	t.Logf("pushed %s (%d layers, manifest %s) in %s", ref, len(res.Layers), res.Manifest.Digest, time.Since(start).Round(time.Millisecond))
	return ref, res
}

// untar unpacks an image layout tarball (directories and regular files).
func untar(tarPath, dir string) error {
	f, err := os.Open(tarPath)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			return fmt.Errorf("%s: entry %q leaves the directory", tarPath, h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			out, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: unexpected entry %q of type %c", tarPath, h.Name, h.Typeflag)
		}
	}
}

// criVariant is one run of the CRI case.
type criVariant struct {
	fsType   string
	baseSize int64
	// contrib is the contrib/containerd file containerd runs with.
	contrib string
	// allThin applies the contrib file's documented switch that puts every
	// pod on thin (CRI's default snapshotter); otherwise pods get thin
	// through contrib's runtime handler runc-thin, and their pulls name it.
	allThin bool
	// class, if set, is a size class of classSize bytes configured in the
	// daemon under this name, in place of contribClass in the contrib
	// file; one pod runs on its handler. Otherwise the daemon has no class
	// and contribClass's proxy plugin names a socket nobody serves.
	class     string
	classSize int64
	// name names the run when fsType does not tell it from the others.
	name string
	// thin, if set, is the daemon's settings instead of thinSettings'
	// small pool.
	thin string
}

// run names the run: its bridge, its transcript.
func (v criVariant) run() string {
	if v.name != "" {
		return v.name
	}
	return v.fsType
}

func (v criVariant) mode() string {
	if v.allThin {
		return "every pod on thin"
	}
	return "runtime handler " + criHandler
}

func (v criVariant) thinSettings() string {
	if v.thin != "" {
		return v.thin
	}
	// A small pool and base size keep the disk-full pod quick.
	return fmt.Sprintf(`[pool]
data_size = '1GiB'
metadata_size = '64MiB'

[snapshot]
base_size = '%d'
fs_type = '%s'
`, v.baseSize, v.fsType) + v.classSettings()
}

func (v criVariant) classSettings() string {
	if v.class == "" {
		return ""
	}
	return fmt.Sprintf("\n[[class]]\nname = %q\nsize = '%d'\n", v.class, v.classSize)
}

// contribContainerdConfig is contrib/containerd/<file> with the thin
// daemon's default sockets and root replaced by the test's (each must occur
// as often as the file has proxy plugins for them, so a changed contrib
// file fails here) and contribClass renamed to v.class, plus the test's own
// CRI settings: the pinned sandbox image, the registry's hosts directory
// and the CNI directories.
func contribContainerdConfig(t *testing.T, v criVariant, s *stack, sandbox, hostsDir, cniBin, cniConf string) string {
	file := v.contrib
	data, err := os.ReadFile(filepath.Join(repoRoot(t), "contrib", "containerd", file))
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(data)
	class := contribClass
	if v.class != "" {
		if !strings.Contains(cfg, "[proxy_plugins."+contribClass+"]") {
			t.Fatalf("contrib/containerd/%s has no proxy plugin %s", file, contribClass)
		}
		cfg = strings.ReplaceAll(cfg, contribClass, v.class)
		class = v.class
	}
	// The class's default socket, next to the main one.
	classAddress := func(main string) string {
		c := config.Default()
		c.Address = main
		c.Classes = []config.ClassConfig{{Name: class}}
		return c.ClassAddress(0)
	}
	for _, r := range []struct {
		key, def, test string
		n              int
	}{
		{"address", config.DefaultAddress, s.thinSock, 1},
		{"address", classAddress(config.DefaultAddress), classAddress(s.thinSock), 1},
		{"root", imagefs.Dir(config.DefaultRoot), imagefs.Dir(s.thinRoot), 2},
	} {
		old := fmt.Sprintf("%s = %q", r.key, r.def)
		if n := strings.Count(cfg, old); n != r.n {
			t.Fatalf("contrib/containerd/%s: %d lines %s, want %d", file, n, old, r.n)
		}
		cfg = strings.ReplaceAll(cfg, old, fmt.Sprintf("%s = %q", r.key, r.test))
	}
	if v.allThin {
		// The switch the contrib file documents. containerd refuses a
		// config that defines this table twice.
		cfg += "\n# The contrib file's switch: every pod on thin.\n[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"thin\"\n"
	}
	return cfg + fmt.Sprintf(`
# Added by the e2e test.
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = %q

[plugins."io.containerd.cri.v1.images".registry]
  config_path = %q

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [%q]
  conf_dir = %q
`, sandbox, hostsDir, cniBin, cniConf)
}

// crictl runs crictl against one containerd and keeps a transcript.
type crictl struct {
	t          *testing.T
	bin, cfg   string
	transcript []transcriptEntry
}

// transcriptEntry is one command; a command repeated (polling) is one
// entry with the last output.
type transcriptEntry struct {
	cmd, text string
	n         int
}

func (c *crictl) record(cmd, text string) {
	if l := len(c.transcript); l > 0 && c.transcript[l-1].cmd == cmd {
		c.transcript[l-1].text = text
		c.transcript[l-1].n++
		return
	}
	c.transcript = append(c.transcript, transcriptEntry{cmd: cmd, text: text, n: 1})
}

func (c *crictl) transcriptText() string {
	var b strings.Builder
	for _, e := range c.transcript {
		if e.n > 1 {
			fmt.Fprintf(&b, "(%d times, the last:)\n", e.n)
		}
		b.WriteString(e.text)
		b.WriteString("\n")
	}
	return b.String()
}

func (c *crictl) run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	// IDs and JSON come on stdout; crictl's warnings on stderr.
	cmdx := exec.CommandContext(ctx, c.bin, append([]string{"--config", c.cfg}, args...)...)
	var stderr strings.Builder
	cmdx.Stderr = &stderr
	stdout, err := cmdx.Output()
	took := time.Since(start)
	out := append(stdout, stderr.String()...)
	shown := slices.Clone(args)
	for i, a := range shown {
		// Scripts, abridged.
		if a = strings.Join(strings.Fields(a), " "); len(a) > 60 {
			a = a[:57] + "..."
		}
		shown[i] = a
	}
	cmd := "$ crictl " + strings.Join(shown, " ")
	line := fmt.Sprintf("%s   (%s)", cmd, took.Round(time.Millisecond))
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > 6 {
		lines = append(lines[:6], fmt.Sprintf("... (%d more lines)", len(lines)-6))
	}
	if len(out) > 0 {
		line += "\n  " + strings.Join(lines, "\n  ")
	}
	if err != nil {
		line += fmt.Sprintf("\n  (error: %v)", err)
	}
	c.record(cmd, line)
	if err != nil {
		return string(stdout), fmt.Errorf("crictl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(stdout), nil
}

func (c *crictl) must(timeout time.Duration, args ...string) string {
	c.t.Helper()
	out, err := c.run(timeout, args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// stop stops a container as the kubelet does and waits until CRI reports it
// exited: StopContainer can return before containerd has recorded the exit,
// and a RemoveContainer in that window is refused as "running".
func (c *crictl) stop(id string) {
	c.t.Helper()
	c.must(5*time.Minute, "stop", "--timeout", "2", id)
	deadline := time.Now().Add(time.Minute)
	for {
		var st struct {
			Status struct {
				State string `json:"state"`
			} `json:"status"`
		}
		decodeJSON(c.t, "crictl inspect", c.must(time.Minute, "inspect", "-o", "json", id), &st)
		if st.Status.State == "CONTAINER_EXITED" {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("container %s is %s a minute after crictl stop", id, st.Status.State)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// mustTimed is must that also returns how long the call took.
func (c *crictl) mustTimed(timeout time.Duration, args ...string) (string, time.Duration) {
	c.t.Helper()
	start := time.Now()
	out := c.must(timeout, args...)
	return strings.TrimSpace(out), time.Since(start)
}

// u64 is a CRI UInt64Value as crictl prints it (protojson: a quoted number).
type u64 struct {
	Value json.Number `json:"value"`
}

func (v *u64) n() uint64 {
	if v == nil {
		return 0
	}
	n, _ := strconv.ParseUint(v.Value.String(), 10, 64)
	return n
}

type fsUsage struct {
	FsID struct {
		Mountpoint string `json:"mountpoint"`
	} `json:"fsId"`
	UsedBytes  *u64 `json:"usedBytes"`
	InodesUsed *u64 `json:"inodesUsed"`
}

type containerStats struct {
	Attributes struct {
		ID       string `json:"id"`
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
	} `json:"attributes"`
	Memory *struct {
		WorkingSetBytes *u64 `json:"workingSetBytes"`
	} `json:"memory"`
	WritableLayer *fsUsage `json:"writableLayer"`
}

func decodeJSON(t *testing.T, what, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, out)
	}
}

// podConfig writes a pod sandbox config for crictl. With a handler, a pull
// given this config unpacks into the handler's snapshotter, as for a
// kubelet that names the handler in its pulls.
func podConfig(t *testing.T, dir, name string, v criVariant) string {
	t.Helper()
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "thin-e2e", "uid": name + "-uid", "attempt": 0},
		"log_directory": filepath.Join(dir, "logs", name),
		// As a kubelet with the cgroupfs driver sets it; CRI's pod stats
		// need it.
		"linux": map[string]any{"cgroup_parent": "/thin-e2e/" + name},
	}
	if !v.allThin {
		cfg["annotations"] = map[string]string{runtimeHandlerAnnotation: criHandler}
	}
	return writeJSON(t, filepath.Join(dir, "pod-"+name+".json"), cfg)
}

func containerConfig(t *testing.T, dir, name string, attempt int, image string) string {
	t.Helper()
	cfg := map[string]any{
		"metadata": map[string]any{"name": name, "attempt": attempt},
		"image":    map[string]any{"image": image},
		"command":  []string{"/bin/sleep", "3600"},
		"log_path": fmt.Sprintf("%s-%d.log", name, attempt),
		"linux":    map[string]any{},
	}
	return writeJSON(t, filepath.Join(dir, fmt.Sprintf("ctr-%s-%d.json", name, attempt)), cfg)
}

func writeJSON(t *testing.T, path string, v any) string {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// pushPause pushes the sandbox image, a busybox userland that sleeps, as
// thin/pause:1 and returns its reference.
func pushPause(t *testing.T, reg *registry, busybox string) string {
	t.Helper()
	bb, err := imagegen.Busybox(busybox)
	if err != nil {
		t.Fatal(err)
	}
	pause := imagegen.Image{Layers: []imagegen.Layer{{Entries: bb, Gzip: true, Comment: "busybox"}}}
	pause.Config.Cmd = []string{"/bin/sh", "-c", "while :; do sleep 3600; done"}
	ref, _ := reg.push(t, pause, "thin/pause:1")
	return ref
}

func TestCRI(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	ct := findCRITools(t)

	// One registry for both runs, holding the test image and the sandbox
	// image pinned in containerd's CRI config.
	reg := startRegistry(t, ct.crane)
	img, expect := e2eImage(t, tl.busybox)
	imgRef, imgRes := reg.push(t, img, "thin/e2e:1")
	pauseRef := pushPause(t, reg, tl.busybox)

	for _, v := range []criVariant{
		// One pod on a size class of 1 GiB; the xfs run keeps the
		// contrib file's class unconfigured.
		{fsType: "ext4", baseSize: 256 << 20, contrib: "config-v3.toml", allThin: true, class: "thin-1g", classSize: 1 << 30},
		// xfs needs at least 300MiB.
		{fsType: "xfs", baseSize: 320 << 20, contrib: "config-v4.toml"},
	} {
		t.Run(v.fsType, func(t *testing.T) {
			runCRI(t, tl, ct, reg, v, imgRef, imgRes, expect, pauseRef)
		})
	}
}

func runCRI(t *testing.T, tl tools, ct criTools, reg *registry, v criVariant, imgRef string, imgRes imagegen.Result,
	expect map[string]string, pauseRef string) {
	tStart := time.Now()
	s, c, dir := startCRI(t, tl, ct, reg, v, pauseRef)

	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()
	ids := thinDevices(t, dm, s.pool, tl.thinLs)
	if len(ids) != 1 {
		t.Fatalf("a fresh pool should hold only the base device, holds %v", ids)
	}
	baseID := ids[0]
	usedAtStart := usedDataBlocks(t, dm, s.pool)

	// Pull through CRI into thin: CRI's default snapshotter, or the
	// handler's named in the pull.
	podA := podConfig(t, dir, "pod-a", v)
	pull := []string{"pull", imgRef}
	// runp names the handler, or takes CRI's default one.
	runp := []string{"runp"}
	if !v.allThin {
		pull = []string{"pull", "--pod-config", podA, imgRef}
		runp = []string{"runp", "--runtime", criHandler}
	}
	_, tPull := c.mustTimed(15*time.Minute, pull...)
	rows := s.listSnapshots()
	var want []snapRow
	for i, id := range imgRes.ChainIDs {
		r := snapRow{key: id.String(), kind: "Committed"}
		if i > 0 {
			r.parent = imgRes.ChainIDs[i-1].String()
		}
		want = append(want, r)
	}
	if !sameRows(rows, want) {
		t.Fatalf("thin snapshots after crictl pull:\n%s\nwant the image's layers:\n%s", formatRows(rows), formatRows(want))
	}
	if out := s.mustCtr(time.Minute, "snapshots", "--snapshotter", "overlayfs", "ls"); len(strings.Split(strings.TrimSpace(out), "\n")) > 1 {
		t.Errorf("crictl pull for %s also unpacked into overlayfs:\n%s", criHandler, out)
	}

	// imagefsinfo names the image filesystem mirror under our root for
	// thin, with at least the large file (CRI refreshes its snapshot usage
	// every 10 s). containerd 2.4 keeps usage for CRI's default snapshotter
	// only: with a handler it answers, with overlayfs first, and nothing
	// for thin.
	if !v.allThin {
		var info struct {
			Status struct {
				ImageFilesystems []fsUsage `json:"imageFilesystems"`
			} `json:"status"`
		}
		decodeJSON(t, "crictl imagefsinfo", c.must(time.Minute, "imagefsinfo", "-o", "json"), &info)
		if len(info.Status.ImageFilesystems) == 0 || !strings.HasSuffix(info.Status.ImageFilesystems[0].FsID.Mountpoint, "overlayfs") {
			t.Errorf("imagefsinfo with CRI's default on overlayfs: %+v", info.Status.ImageFilesystems)
		}
	}
	var thinFS *fsUsage
	for deadline := time.Now().Add(2 * time.Minute); v.allThin && thinFS == nil; {
		var info struct {
			Status struct {
				ImageFilesystems []fsUsage `json:"imageFilesystems"`
			} `json:"status"`
		}
		decodeJSON(t, "crictl imagefsinfo", c.must(time.Minute, "imagefsinfo", "-o", "json"), &info)
		for i, fs := range info.Status.ImageFilesystems {
			// CRI's default snapshotter comes first: the kubelet reads
			// only that one.
			if i == 0 && fs.FsID.Mountpoint == imagefs.Dir(s.thinRoot) && fs.UsedBytes.n() >= bigSize {
				thinFS = &info.Status.ImageFilesystems[i]
			}
		}
		if thinFS == nil {
			if time.Now().After(deadline) {
				t.Fatalf("crictl imagefsinfo has no filesystem at %s using at least %d bytes: %+v", imagefs.Dir(s.thinRoot), bigSize, info.Status.ImageFilesystems)
			}
			time.Sleep(2 * time.Second)
		}
	}
	if thinFS != nil {
		t.Logf("imagefsinfo: thin at %s, %d bytes, %d inodes", thinFS.FsID.Mountpoint, thinFS.UsedBytes.n(), thinFS.InodesUsed.n())
	}

	// Pod A: runp, create, start, and the image read back in the container.
	podAID, tRunp := c.mustTimed(15*time.Minute, append(runp, podA)...)
	ctrA, tCreate := c.mustTimed(15*time.Minute, "create", "--no-pull", podAID, containerConfig(t, dir, "app", 0, imgRef), podA)
	_, tStartCtr := c.mustTimed(15*time.Minute, "start", ctrA)
	out := c.must(10*time.Minute, "exec", "-s", ctrA, "/bin/sh", "-c", containerScript)
	got := parseKV(out)
	for k, want := range expect {
		if got[k] != want {
			t.Errorf("container: %s = %q, want %q", k, got[k], want)
		}
	}
	rootA := s.checkRoot(t, dm, got["root"], v)
	s.checkFsSize(t, c, ctrA, v)

	// Real networking: the pod has its CNI address on eth0.
	ipA := podIP(t, c, podAID)
	if out := c.must(time.Minute, "exec", "-s", ctrA, "/bin/ip", "-4", "addr", "show", "eth0"); !strings.Contains(out, "inet "+ipA+"/") {
		t.Errorf("pod A's eth0 lacks its CNI address %s:\n%s", ipA, out)
	}

	// stats and statsp: the writable layer holds what the container wrote
	// (16 MiB of scratch), and not more than its device.
	if v.allThin {
		waitWritable(t, c, ctrA, "stats", 16<<20, uint64(v.baseSize))
		waitWritable(t, c, ctrA, "statsp", 16<<20, uint64(v.baseSize))
	} else {
		// Only answers and the container's entry: its usage is 0 here.
		waitWritable(t, c, ctrA, "stats", 0, uint64(v.baseSize))
		waitWritable(t, c, ctrA, "statsp", 0, uint64(v.baseSize))
	}

	// Pod B on the same image: its own device, nothing of A's writes,
	// and the bridge between the pods.
	podB := podConfig(t, dir, "pod-b", v)
	podBID := c.must(15*time.Minute, append(runp, podB)...)
	podBID = strings.TrimSpace(podBID)
	ctrB := strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podBID, containerConfig(t, dir, "app", 0, imgRef), podB))
	c.must(15*time.Minute, "start", ctrB)
	gotB := parseKV(c.must(5*time.Minute, "exec", "-s", ctrB, "/bin/sh", "-c",
		`echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"; echo "written=$(cat /written 2>&1)"; echo "keep=$(cat /data/keep)"; echo "ping=$(ping -c 1 -W 10 `+ipA+` >/dev/null 2>&1 && echo ok)"`))
	rootB := s.checkRoot(t, dm, gotB["root"], v)
	if rootB == rootA {
		t.Errorf("pods A and B share the root device %s", rootA)
	}
	if !strings.Contains(gotB["written"], "No such file") || gotB["keep"] != "new" {
		t.Errorf("pod B sees written=%q keep=%q, want A's file absent and the image's /data/keep", gotB["written"], gotB["keep"])
	}
	if gotB["ping"] != "ok" {
		t.Errorf("pod B cannot ping pod A at %s over the bridge", ipA)
	}

	// Pod K on the size class, through its runtime handler: CRI unpacks
	// the image (and the sandbox image) for the class at runp and create,
	// which the daemon answers with thin snapshots of the layers thin
	// already has. The container's / is a device of the class's size.
	var ctrK, podKID string
	if v.class != "" {
		st, err := dm.PoolStatus(s.pool)
		if err != nil {
			t.Fatal(err)
		}
		handler := "runc-" + v.class
		podK := podConfig(t, dir, "pod-k", v)
		podKID = strings.TrimSpace(c.must(15*time.Minute, "runp", "--runtime", handler, podK))
		ctrK = strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podKID, containerConfig(t, dir, "sized", 0, imgRef), podK))
		c.must(15*time.Minute, "start", ctrK)
		gotK := parseKV(c.must(5*time.Minute, "exec", "-s", ctrK, "/bin/sh", "-c",
			`echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"; echo "keep=$(cat /data/keep)"; echo "df=$(df -k / | tail -n 1)"`))
		sized := v
		sized.baseSize = v.classSize
		rootK := s.checkRoot(t, dm, gotK["root"], sized)
		s.checkFsSize(t, c, ctrK, sized)
		if rootK == rootA || rootK == rootB || gotK["keep"] != "new" {
			t.Errorf("pod K on %s: root %s (A %s, B %s), /data/keep %q", handler, rootK, rootA, rootB, gotK["keep"])
		}
		// Shared, not unpacked: a second unpack would write the large
		// file's layer again.
		tbl, err := dm.Table(s.pool)
		if err != nil || len(tbl) != 1 {
			t.Fatalf("table of %s: %v %v", s.pool, tbl, err)
		}
		pp, err := dmsetup.ParsePoolParams(tbl[0].Params)
		if err != nil {
			t.Fatal(err)
		}
		blockBytes := uint64(pp.BlockSizeSectors) * dmsetup.SectorSize
		grew := (usedDataBlocks(t, dm, s.pool) - st.UsedDataBlocks) * blockBytes
		t.Logf("pod K on %s: df %s; the pool grew by %d bytes", handler, gotK["df"], grew)
		if grew >= bigSize/2 {
			t.Errorf("the pool grew by %d bytes for pod K: the image was unpacked again for %s, not shared", grew, v.class)
		}
		out := s.mustCtr(time.Minute, "snapshots", "--snapshotter", v.class, "ls")
		for _, id := range imgRes.ChainIDs {
			if !strings.Contains(out, id.String()) {
				t.Errorf("%s does not list layer %s:\n%s", v.class, id, out)
			}
		}
	}

	// A restart as the kubelet does it: CRI starts a container only once,
	// so the stopped container stays (its writes on its device) and a new
	// attempt of it starts on a fresh device.
	c.stop(ctrA)
	if _, err := c.run(time.Minute, "start", ctrA); err == nil {
		t.Errorf("CRI started an exited container again")
	}
	ctrA1 := strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podAID, containerConfig(t, dir, "app", 1, imgRef), podA))
	c.must(15*time.Minute, "start", ctrA1)
	gotA1 := parseKV(c.must(5*time.Minute, "exec", "-s", ctrA1, "/bin/sh", "-c",
		`echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"; echo "written=$(cat /written 2>&1)"`))
	rootA1 := s.checkRoot(t, dm, gotA1["root"], v)
	if rootA1 == rootA || rootA1 == rootB {
		t.Errorf("the restarted container reuses root device %s (A %s, B %s)", rootA1, rootA, rootB)
	}
	sctx, sn := snapshotsClient(t, s.ctrdSock, s.ns)
	am, err := sn.Mounts(sctx, ctrA)
	if err != nil {
		t.Fatalf("mounts of the stopped container's snapshot: %v", err)
	}
	withMounted(t, am, func(mnt string) {
		if data, err := os.ReadFile(filepath.Join(mnt, "written")); err != nil || string(data) != "written by the container\n" {
			t.Errorf("the stopped container's /written: %q, %v", data, err)
		}
	})

	// Pod C fills its disk: ENOSPC for it, nothing for the pool and the
	// other pods.
	podC := podConfig(t, dir, "pod-c", v)
	podCID := strings.TrimSpace(c.must(15*time.Minute, append(runp, podC)...))
	ctrC := strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podCID, containerConfig(t, dir, "filler", 0, imgRef), podC))
	c.must(15*time.Minute, "start", ctrC)
	start := time.Now()
	out = c.must(15*time.Minute, "exec", "-s", ctrC, "/bin/sh", "-c",
		`dd if=/dev/zero of=/fill bs=1M 2>&1 | tail -n 3; sync; echo "df=$(df -k / | tail -n 1)"`)
	t.Logf("pod C filled its disk in %s:\n%s", time.Since(start).Round(time.Millisecond), out)
	if !strings.Contains(out, "No space left on device") {
		t.Errorf("writing until full in pod C: no ENOSPC:\n%s", out)
	}
	if st, err := dm.PoolStatus(s.pool); err != nil {
		t.Fatal(err)
	} else if st.Mode != dmsetup.PoolModeRW || st.NeedsCheck || st.Fail || st.Error {
		t.Errorf("pool after pod C filled its disk: %+v", st)
	} else {
		t.Logf("pool after pod C filled its disk: %d/%d data blocks, mode %s", st.UsedDataBlocks, st.TotalDataBlocks, st.Mode)
	}
	for _, id := range []string{ctrA1, ctrB} {
		if out := c.must(5*time.Minute, "exec", "-s", id, "/bin/sh", "-c", "echo fine > /after && sync && cat /after"); strings.TrimSpace(out) != "fine" {
			t.Errorf("container %s after pod C filled its disk: %q", id, out)
		}
	}

	// Tear down as the kubelet would, then remove the images.
	start = time.Now()
	running, pods := []string{ctrA1, ctrB, ctrC}, []string{podAID, podBID, podCID}
	if ctrK != "" {
		running, pods = append(running, ctrK), append(pods, podKID)
	}
	for _, id := range running {
		c.stop(id)
	}
	c.must(5*time.Minute, append([]string{"rm", ctrA}, running...)...)
	tRm := time.Since(start)
	for _, id := range pods {
		c.must(5*time.Minute, "stopp", id)
		c.must(5*time.Minute, "rmp", id)
	}
	c.must(5*time.Minute, "rmi", imgRef)
	// prune leaves pinned images: the sandbox image goes by name.
	c.must(5*time.Minute, "rmi", "--prune")
	var imgs struct {
		Images []struct {
			RepoTags []string `json:"repoTags"`
			Pinned   bool     `json:"pinned"`
		} `json:"images"`
	}
	decodeJSON(t, "crictl images", c.must(time.Minute, "images", "-o", "json"), &imgs)
	if len(imgs.Images) != 1 || !imgs.Images[0].Pinned || !slices.Contains(imgs.Images[0].RepoTags, pauseRef) {
		t.Errorf("images after rmi and rmi --prune: %+v, want only the pinned %s", imgs.Images, pauseRef)
	}
	c.must(5*time.Minute, "rmi", pauseRef)
	if out := c.must(time.Minute, "images", "-q"); strings.TrimSpace(out) != "" {
		t.Errorf("images left after removing the sandbox image:\n%s", out)
	}
	var left []snapRow
	for deadline := time.Now().Add(2 * time.Minute); ; {
		left = s.listSnapshots()
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(left) != 0 {
		t.Fatalf("thin snapshots left 2 min after removing pods and images:\n%s", formatRows(left))
	}
	if v.class != "" {
		if out := s.mustCtr(time.Minute, "snapshots", "--snapshotter", v.class, "ls"); len(strings.Split(strings.TrimSpace(out), "\n")) > 1 {
			t.Errorf("%s snapshots left after removing pods and images:\n%s", v.class, out)
		}
	}
	for deadline := time.Now().Add(2 * time.Minute); ; {
		ids = thinDevices(t, dm, s.pool, tl.thinLs)
		if len(ids) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(ids) != 1 || ids[0] != baseID {
		t.Errorf("pool holds %v after removal, want only the base device %s", ids, baseID)
	}
	if a := activeThins(t, dm, s.pool); len(a) != 0 {
		t.Errorf("active thin devices after removal: %v", a)
	}
	if used := usedDataBlocks(t, dm, s.pool); used != usedAtStart {
		t.Errorf("pool uses %d data blocks after removal, %d after start", used, usedAtStart)
	}

	if err := s.ctrd.Stop(time.Minute); err != nil {
		t.Errorf("containerd: %v", err)
	}
	if err := s.thin.Stop(time.Minute); err != nil {
		t.Errorf("thin-snapshotter did not exit cleanly: %v", err)
	}
	s.check("after the CRI run")
	s.checkOnlyPool(t, dm)
	t.Logf("timings (%s, %s): pull %s, runp %s, create %s, start %s, stop+rm of %d containers %s, total %s", v.fsType, v.mode(),
		tPull.Round(time.Millisecond), tRunp.Round(time.Millisecond), tCreate.Round(time.Millisecond),
		tStartCtr.Round(time.Millisecond), len(running)+1, tRm.Round(time.Millisecond), time.Since(tStart).Round(time.Millisecond))
}

// startCRI starts the stack of v (containerd with CRI on contrib's
// configuration), a CNI bridge of its own and crictl, and waits until CRI
// is ready. dir is the run's directory.
func startCRI(t *testing.T, tl tools, ct criTools, reg *registry, v criVariant, pauseRef string) (s *stack, c *crictl, dir string) {
	dir = t.TempDir()
	hostsDir := filepath.Join(dir, "certs.d")
	cniConf := filepath.Join(dir, "net.d")
	for _, d := range []string{filepath.Join(hostsDir, reg.addr), cniConf} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Plain HTTP to the test registry.
	hosts := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.addr, reg.addr)
	if err := os.WriteFile(filepath.Join(hostsDir, reg.addr, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	// A bridge per run; CRI adds the loopback plugin itself.
	bridge := "thin-" + v.run()
	subnet := map[string]string{"ext4": "10.88.41.0/24", "xfs": "10.88.42.0/24", "imagefs": "10.88.43.0/24"}[v.run()]
	writeJSON(t, filepath.Join(cniConf, "10-thin-e2e.conflist"), map[string]any{
		"cniVersion": "1.0.0",
		"name":       "thin-e2e",
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": subnet}}},
				"dataDir": filepath.Join(dir, "ipam"),
			},
		}},
	})

	s = startStackWith(t, tl, stackOptions{
		thinSettings: v.thinSettings(),
		namespace:    criNamespace,
		containerdConfig: func(s *stack) (string, []string) {
			return contribContainerdConfig(t, v, s, pauseRef, hostsDir, ct.cniDir, cniConf),
				[]string{"--root", filepath.Join(s.dir, "containerd", "root"), "--state", filepath.Join(s.dir, "containerd", "state"),
					"--address", s.ctrdSock}
		},
		cleanup: func(s *stack) {
			if c == nil {
				return
			}
			_, _ = c.run(5*time.Minute, "rmp", "--all", "--force")
			_, _ = c.run(5*time.Minute, "rmi", "--all")
		},
	})
	crictlCfg := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 300\n", s.ctrdSock, s.ctrdSock)
	c = &crictl{t: t, bin: ct.crictl, cfg: filepath.Join(dir, "crictl.yaml")}
	if err := os.WriteFile(c.cfg, []byte(crictlCfg), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		t.Logf("crictl transcript (%s, %s, %s):\n%s", v.run(), v.contrib, v.mode(), c.transcriptText())
	})

	// CRI is up once its runtime and (CNI config loaded) network are ready.
	for deadline := time.Now().Add(2 * time.Minute); ; {
		out, err := c.run(time.Minute, "info")
		var info struct {
			Status struct {
				Conditions []struct {
					Type   string `json:"type"`
					Status bool   `json:"status"`
				} `json:"conditions"`
			} `json:"status"`
		}
		ready := 0
		if err == nil && json.Unmarshal([]byte(out), &info) == nil {
			for _, cond := range info.Status.Conditions {
				if cond.Status && (cond.Type == "RuntimeReady" || cond.Type == "NetworkReady") {
					ready++
				}
			}
		}
		if ready == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("CRI not ready after 2 min: %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
	return s, c, dir
}

// checkRoot checks a container's root mount line ("device fstype options"):
// a read-write v.fsType thin device of the pool whose size is the base
// size. It returns the device.
func (s *stack) checkRoot(t *testing.T, dm *dmsetup.Client, line string, v criVariant) string {
	t.Helper()
	f := strings.Fields(line)
	if len(f) != 3 || !isThinNode(s.pool, f[0]) || f[1] != v.fsType ||
		!slices.Contains(strings.Split(f[2], ","), "rw") {
		t.Errorf("container root mount %q: want a rw %s /dev/mapper/%s<id>", line, v.fsType, dmsetup.DeviceNamePrefix(s.pool))
		return line
	}
	tbl, err := dm.Table(strings.TrimPrefix(f[0], "/dev/mapper/"))
	if err != nil {
		t.Fatalf("table of %s: %v", f[0], err)
	}
	if len(tbl) != 1 || tbl[0].Type != "thin" || int64(tbl[0].Length)*512 != v.baseSize {
		t.Errorf("%s: table %v, want one thin target of %d bytes", f[0], tbl, v.baseSize)
	}
	return f[0]
}

// checkFsSize checks that the filesystem the container sees spans its
// device, less the filesystem's own overhead.
func (s *stack) checkFsSize(t *testing.T, c *crictl, id string, v criVariant) {
	t.Helper()
	out := strings.Fields(c.must(time.Minute, "exec", "-s", id, "/bin/stat", "-f", "-c", "%b %S", "/"))
	if len(out) != 2 {
		t.Fatalf("stat -f /: %q", out)
	}
	blocks, err1 := strconv.ParseInt(out[0], 10, 64)
	bsize, err2 := strconv.ParseInt(out[1], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("stat -f /: %q", out)
	}
	size := blocks * bsize
	t.Logf("the container's / (%s): %d bytes on a %d-byte device", v.fsType, size, v.baseSize)
	// xfs keeps at least 64 MiB for its log on filesystems of 300 MiB and
	// more (xfsprogs 5.15+): 256 of 320 MiB.
	if size > v.baseSize || size < v.baseSize*3/4 {
		t.Errorf("the container's / is %d bytes, want most of its %d-byte device", size, v.baseSize)
	}
}

func podIP(t *testing.T, c *crictl, podID string) string {
	t.Helper()
	var p struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
	}
	decodeJSON(t, "crictl inspectp", c.must(time.Minute, "inspectp", "-o", "json", podID), &p)
	if net.ParseIP(p.Status.Network.IP) == nil {
		t.Fatalf("pod %s has no IP address: %+v", podID, p)
	}
	return p.Status.Network.IP
}

// waitWritable waits until crictl stats or statsp reports the container's
// writable layer at atLeast bytes or more (CRI polls Usage every 10 s), and
// checks it against atMost.
func waitWritable(t *testing.T, c *crictl, id, cmd string, atLeast, atMost uint64) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; {
		out := c.must(time.Minute, cmd, "-o", "json")
		var all []containerStats
		switch cmd {
		case "stats":
			var r struct {
				Stats []containerStats `json:"stats"`
			}
			decodeJSON(t, "crictl stats", out, &r)
			all = r.Stats
		case "statsp":
			var r struct {
				Stats []struct {
					Linux struct {
						Containers []containerStats `json:"containers"`
					} `json:"linux"`
				} `json:"stats"`
			}
			decodeJSON(t, "crictl statsp", out, &r)
			for _, p := range r.Stats {
				all = append(all, p.Linux.Containers...)
			}
		}
		for _, st := range all {
			if st.Attributes.ID != id || st.WritableLayer == nil {
				continue
			}
			used := st.WritableLayer.UsedBytes.n()
			if used >= atLeast {
				t.Logf("crictl %s: container %s writable layer %d bytes, %d inodes, at %q", cmd, id[:12], used,
					st.WritableLayer.InodesUsed.n(), st.WritableLayer.FsID.Mountpoint)
				if used > atMost {
					t.Errorf("crictl %s: writable layer %d bytes, more than the device's %d", cmd, used, atMost)
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Errorf("crictl %s never reported container %s's writable layer at %d bytes or more:\n%s", cmd, id, atLeast, out)
			return
		}
		time.Sleep(2 * time.Second)
	}
}

// checkOnlyPool checks that, with both daemons stopped, the pool is the
// only dm device left, then tears it down.
func (s *stack) checkOnlyPool(t *testing.T, dm *dmsetup.Client) {
	t.Helper()
	devs, err := dm.List()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	if len(names) != 1 || names[0] != s.pool {
		t.Errorf("dm devices after both daemons stopped: %v, want only the pool %s", names, s.pool)
	}
	if err := dmtest.DestroyLoopPool(context.Background(), s.pool, filepath.Join(s.thinRoot, "pool")); err != nil {
		t.Fatalf("destroy the pool: %v", err)
	}
	s.poolGone = true
}
