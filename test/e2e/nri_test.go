package e2e

// Per-pod disk sizes through containerd's NRI: containerd 2.4.2 with CRI
// and NRI as contrib/containerd configures them, crictl as the kubelet,
// and thin-snapshotter registered as an NRI plugin that grows each new
// container's root filesystem to the size its pod's annotations ask for.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/internal/podsize"
	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

func TestCRINRI(t *testing.T) {
	dmtest.Require(t)
	tl := findTools(t)
	ct := findCRITools(t)

	// One small image of two layers serves as the sandbox image and the
	// containers' image.
	reg := startRegistry(t, ct.crane)
	bb, err := imagegen.Busybox(tl.busybox)
	if err != nil {
		t.Fatal(err)
	}
	img := imagegen.Image{Layers: []imagegen.Layer{
		{Entries: bb, Gzip: true, Comment: "busybox"},
		{Entries: []imagegen.Entry{imagegen.Dir("data", 0o755), imagegen.File("data/marker", 0o644, "from the image\n")}, Comment: "marker"},
	}}
	img.Config.Cmd = []string{"/bin/sh", "-c", "while :; do sleep 3600; done"}
	ref, _ := reg.push(t, img, "thin/nri:1")

	for _, v := range []struct {
		criVariant
		// validator turns NRI's default validator on, and pods require
		// the plugin with its annotation, as operations.md shows.
		validator bool
	}{
		// Through the runtime handler runc-thin, and a size class.
		{criVariant: criVariant{fsType: "ext4", baseSize: 256 << 20, contrib: "config-v3.toml", class: "thin-1g", classSize: 1 << 30}},
		// Every pod on thin.
		{criVariant: criVariant{fsType: "xfs", baseSize: 320 << 20, contrib: "config-v4.toml", allThin: true}, validator: true},
	} {
		t.Run(v.fsType, func(t *testing.T) {
			runNRI(t, tl, ct, reg, v.criVariant, v.validator, ref)
		})
	}
}

// requiredPlugins is NRI's default validator's annotation; the plugin's
// name is the one operations.md documents.
const requiredPlugins = "required-plugins.noderesource.dev/pod"

// nriRun is one run of the NRI case: the stack, crictl, and what the test
// needs to restart containerd.
type nriRun struct {
	t         *testing.T
	v         criVariant
	s         *stack
	c         *crictl
	dm        *dmsetup.Client
	dir, ref  string
	nriSocket string
	metrics   string // host:port of the daemon's /metrics
	ctrdArgs  []string
	restarts  int
	validator bool
}

func runNRI(t *testing.T, tl tools, ct criTools, reg *registry, v criVariant, validator bool, ref string) {
	tStart := time.Now()
	n := &nriRun{t: t, v: v, dir: t.TempDir(), ref: ref, validator: validator}
	n.start(tl, ct, reg)
	s, c := n.s, n.c
	defer func() {
		t.Logf("crictl transcript (NRI, %s, %s, %s):\n%s", v.fsType, v.contrib, v.mode(), c.transcriptText())
	}()
	ids := thinDevices(t, n.dm, s.pool, tl.thinLs)
	if len(ids) != 1 {
		t.Fatalf("a fresh pool should hold only the base device, holds %v", ids)
	}
	baseID := ids[0]
	n.waitMetric("thin_snapshotter_nri_connected", 1)

	pod := func(name string, annotations map[string]string) string { return n.podConfig(name, annotations) }
	if v.allThin {
		c.must(15*time.Minute, "pull", ref)
	} else {
		c.must(15*time.Minute, "pull", "--pod-config", pod("pull", nil), ref)
	}

	// A pod asking 2 GiB for every container, and its first container's
	// creation timed against a pod that asks for nothing.
	podA, ctrsA, tA := n.runPod("pod-a", "", map[string]string{podsize.PodKey: "2Gi"}, "app")
	n.checkSize(ctrsA[0], 2<<30)
	podC, ctrsC, tC := n.runPod("pod-c", "", nil, "plain")
	n.checkSize(ctrsC[0], v.baseSize)
	t.Logf("crictl create: %s for a container grown to 2 GiB, %s for one of the base size", tA, tC)

	// Two containers of one pod, each with its own size.
	podB, ctrsB, _ := n.runPod("pod-b", "", map[string]string{
		podsize.ContainerKey("one"): "1Gi", podsize.ContainerKey("two"): "1536Mi",
	}, "one", "two")
	n.checkSize(ctrsB[0], 1<<30)
	n.checkSize(ctrsB[1], 1536<<20)

	// A bad value fails the creation, naming the annotation; nothing of
	// the container stays. So does a pod that requires a plugin that is
	// not registered, with the default validator.
	n.refused("pod-bad", map[string]string{podsize.PodKey: "lots"}, fmt.Sprintf("annotation %s=%q", podsize.PodKey, "lots"))
	if n.validator {
		n.refused("pod-req", map[string]string{podsize.PodKey: "1Gi", requiredPlugins: `["not-registered"]`},
			`required plugin "not-registered" not present`)
	}

	// A size class is the floor; a container asking for more grows. The
	// class's layers are the main socket's, shared.
	pods := []string{podA, podB, podC}
	if v.class != "" {
		podK, ctrsK, _ := n.runPod("pod-k", "runc-"+v.class, map[string]string{
			podsize.PodKey: "512Mi", podsize.ContainerKey("big"): "3Gi",
		}, "small", "big")
		n.checkSize(ctrsK[0], v.classSize)
		n.checkSize(ctrsK[1], 3<<30)
		pods = append(pods, podK)
	}

	// A container restart, as the kubelet does it: a new attempt on a
	// new snapshot, with its pod's size again.
	c.stop(ctrsA[0])
	ctrA1 := strings.TrimSpace(c.must(15*time.Minute, "create", "--no-pull", podA,
		containerConfig(t, n.dir, "app", 1, ref), n.podConfigPath("pod-a")))
	c.must(15*time.Minute, "start", ctrA1)
	n.checkSize(ctrA1, 2<<30)

	// containerd restarts: the daemon registers again, and the next pod
	// gets its size.
	n.restartContainerd()
	t.Logf("registered with NRI again when CRI was ready: %v", n.scrape()["thin_snapshotter_nri_connected"] == 1)
	sizedE := map[string]string{podsize.PodKey: "1536Mi"}
	if n.validator {
		sizedE[requiredPlugins] = `["thin-snapshotter"]`
	} else {
		// containerd's own key, in bytes; containerd also copies it to
		// the pod sandbox's snapshot as the label.
		sizedE = map[string]string{"containerd.io/snapshot/max-size": strconv.Itoa(1536 << 20)}
	}
	podE, ctrsE, _ := n.runPod("pod-e", "", sizedE, "app")
	n.checkSize(ctrsE[0], 1536<<20)
	pods = append(pods, podE)

	n.reportGrows()
	n.teardown(pods, baseID)
	t.Logf("NRI run (%s, %s) took %s", v.fsType, v.mode(), time.Since(tStart).Round(time.Millisecond))
}

// start starts the stack with contrib's containerd configuration, NRI on a
// socket of the test's, and the daemon's metrics.
func (n *nriRun) start(tl tools, ct criTools, reg *registry) {
	t, v := n.t, n.v
	hostsDir := filepath.Join(n.dir, "certs.d")
	cniConf := filepath.Join(n.dir, "net.d")
	for _, d := range []string{filepath.Join(hostsDir, reg.addr), cniConf} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	hosts := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.addr, reg.addr)
	if err := os.WriteFile(filepath.Join(hostsDir, reg.addr, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	n.nriSocket = filepath.Join(n.dir, "nri", "nri.sock")
	n.metrics = freeAddr(t)
	// Root keys first: the settings start with tables.
	settings := fmt.Sprintf("metrics_address = %q\n\n", n.metrics) + v.thinSettings() +
		fmt.Sprintf("\n[nri]\nsocket_path = %q\n", n.nriSocket)
	n.s = startStackWith(t, tl, stackOptions{
		thinSettings: settings,
		namespace:    criNamespace,
		containerdConfig: func(s *stack) (string, []string) {
			cfg := contribContainerdConfig(t, v, s, n.ref, hostsDir, ct.cniDir, cniConf)
			old := fmt.Sprintf("socket_path = %q", config.DefaultNRISocket)
			if strings.Count(cfg, old) != 1 {
				t.Fatalf("contrib/containerd/%s: want one line %s", v.contrib, old)
			}
			cfg = strings.Replace(cfg, old, fmt.Sprintf("socket_path = %q", n.nriSocket), 1)
			if n.validator {
				cfg += "\n[plugins.\"io.containerd.nri.v1.nri\".default_validator]\n  enable = true\n"
			}
			n.ctrdArgs = []string{"--root", filepath.Join(s.dir, "containerd", "root"), "--state", filepath.Join(s.dir, "containerd", "state"),
				"--address", s.ctrdSock}
			return cfg, n.ctrdArgs
		},
		cleanup: func(s *stack) {
			if n.c == nil {
				return
			}
			_, _ = n.c.run(5*time.Minute, "rmp", "--all", "--force")
			_, _ = n.c.run(5*time.Minute, "rmi", "--all")
		},
	})
	n.c = &crictl{t: t, bin: ct.crictl, cfg: filepath.Join(n.dir, "crictl.yaml")}
	crictlCfg := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 300\n", n.s.ctrdSock, n.s.ctrdSock)
	if err := os.WriteFile(n.c.cfg, []byte(crictlCfg), 0o644); err != nil {
		t.Fatal(err)
	}
	dm, err := dmsetup.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dm.Close() })
	n.dm = dm
	n.waitRuntimeReady()
}

// freeAddr is a loopback address with a port nobody listens on now.
func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require(t, err == nil, "no TCP on 127.0.0.1 (is lo up?): %v", err)
	defer l.Close()
	return l.Addr().String()
}

// waitRuntimeReady waits until CRI's runtime is ready. The pods use the
// node's network: no CNI.
func (n *nriRun) waitRuntimeReady() {
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		out, err := n.c.run(time.Minute, "info")
		var info struct {
			Status struct {
				Conditions []struct {
					Type   string `json:"type"`
					Status bool   `json:"status"`
				} `json:"conditions"`
			} `json:"status"`
		}
		if err == nil && json.Unmarshal([]byte(out), &info) == nil {
			for _, cond := range info.Status.Conditions {
				if cond.Type == "RuntimeReady" && cond.Status {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("CRI's runtime not ready after 2 min: %v\n%s", err, out)
		}
	}
}

func (n *nriRun) podConfigPath(name string) string {
	return filepath.Join(n.dir, "pod-"+name+".json")
}

// podConfig writes a pod's config: on the node's network, on thin by the
// variant's way, with annotations.
func (n *nriRun) podConfig(name string, annotations map[string]string) string {
	all := maps.Clone(annotations)
	if all == nil {
		all = map[string]string{}
	}
	if !n.v.allThin {
		all[runtimeHandlerAnnotation] = criHandler
	}
	return writeJSON(n.t, n.podConfigPath(name), map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "thin-nri", "uid": name + "-uid", "attempt": 0},
		"log_directory": filepath.Join(n.dir, "logs", name),
		"annotations":   all,
		"linux": map[string]any{
			"cgroup_parent": "/thin-nri/" + name,
			// NODE: no CNI.
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		},
	})
}

// runPod runs a pod on handler (the variant's when empty) and creates and
// starts its containers; it returns the pod's id, the containers' ids and
// how long the first container's creation took.
func (n *nriRun) runPod(name, handler string, annotations map[string]string, containers ...string) (string, []string, time.Duration) {
	n.t.Helper()
	cfg := n.podConfig(name, annotations)
	runp := []string{"runp"}
	switch {
	case handler != "":
		runp = append(runp, "--runtime", handler)
	case !n.v.allThin:
		runp = append(runp, "--runtime", criHandler)
	}
	podID := strings.TrimSpace(n.c.must(15*time.Minute, append(runp, cfg)...))
	var ids []string
	var first time.Duration
	for i, ctr := range containers {
		id, took := n.c.mustTimed(15*time.Minute, "create", "--no-pull", podID, containerConfig(n.t, n.dir, ctr, 0, n.ref), cfg)
		if i == 0 {
			first = took
		}
		n.c.must(15*time.Minute, "start", id)
		ids = append(ids, id)
	}
	return podID, ids, first
}

// checkSize checks that container id's root is a thin device of size bytes
// whose filesystem fills it, with the image's files.
func (n *nriRun) checkSize(id string, size int64) {
	n.t.Helper()
	got := parseKV(n.c.must(5*time.Minute, "exec", "-s", id, "/bin/sh", "-c",
		`echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"; echo "marker=$(cat /data/marker)"; echo "df=$(df -k / | tail -n 1)"`))
	sized := n.v
	sized.baseSize = size
	n.s.checkRoot(n.t, n.dm, got["root"], sized)
	n.s.checkFsSize(n.t, n.c, id, sized)
	if got["marker"] != "from the image" {
		n.t.Errorf("container %s: /data/marker %q, want the image's file", id, got["marker"])
	}
	n.t.Logf("container %s: df %s", id[:12], got["df"])
}

// refused runs a pod whose container's creation must fail with an error
// that says want; the snapshot containerd prepared for the container goes,
// and the pod's with the pod.
func (n *nriRun) refused(name string, annotations map[string]string, want string) {
	n.t.Helper()
	before := n.s.listSnapshots()
	cfg := n.podConfig(name, annotations)
	runp := []string{"runp"}
	if !n.v.allThin {
		runp = append(runp, "--runtime", criHandler)
	}
	podID := strings.TrimSpace(n.c.must(15*time.Minute, append(runp, cfg)...))
	out, err := n.c.run(15*time.Minute, "create", "--no-pull", podID, containerConfig(n.t, n.dir, "refused", 0, n.ref), cfg)
	// crictl's log quotes the message, escaping its quotes.
	if err == nil || !strings.Contains(strings.ReplaceAll(err.Error(), `\"`, `"`), want) {
		n.t.Errorf("creating a container of %s (annotations %v): %v %s; want a failure saying %s", name, annotations, err, out, want)
	}
	if ps := strings.TrimSpace(n.c.must(time.Minute, "ps", "-a", "-q", "--pod", podID)); ps != "" {
		n.t.Errorf("the refused container is listed: %s", ps)
	}
	n.c.must(5*time.Minute, "stopp", podID)
	n.c.must(5*time.Minute, "rmp", podID)
	var after []snapRow
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		after = n.s.listSnapshots()
		if sameRows(after, before) || time.Now().After(deadline) {
			break
		}
	}
	if !sameRows(after, before) {
		n.t.Errorf("thin snapshots after the refused container and its pod went:\n%s\nbefore:\n%s", formatRows(after), formatRows(before))
	}
}

// restartContainerd stops containerd and starts it again on the same
// configuration; running containers keep running.
func (n *nriRun) restartContainerd() {
	t, s := n.t, n.s
	t.Helper()
	if err := s.ctrd.Stop(time.Minute); err != nil {
		t.Logf("containerd stopped: %v", err)
	}
	n.waitMetric("thin_snapshotter_nri_connected", 0)
	n.restarts++
	path := "PATH=" + s.tl.ctrdDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	start := time.Now()
	s.ctrd = startDaemon(t, "containerd", filepath.Join(s.dir, fmt.Sprintf("containerd-%d.log", n.restarts)), []string{path}, s.tl.containerd,
		append([]string{"--config", filepath.Join(s.dir, "containerd.toml")}, n.ctrdArgs...)...)
	waitSocket(t, s.ctrd, s.ctrdSock, 2*time.Minute)
	n.waitRuntimeReady()
	t.Logf("containerd restarted and CRI ready after %s", time.Since(start).Round(time.Millisecond))
}

// scrape reads the daemon's metrics: each sample line's value by its name
// and labels.
func (n *nriRun) scrape() map[string]float64 {
	n.t.Helper()
	resp, err := http.Get("http://" + n.metrics + "/metrics")
	if err != nil {
		n.t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m
}

// waitMetric waits up to a minute for a metric to have a value.
func (n *nriRun) waitMetric(name string, want float64) {
	n.t.Helper()
	for deadline := time.Now().Add(time.Minute); n.scrape()[name] != want; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			n.t.Fatalf("%s is %v after a minute, want %v", name, n.scrape()[name], want)
		}
	}
}

// reportGrows logs the time each grow took in the NRI hook, from the
// daemon's log, and checks the plugin's counts.
func (n *nriRun) reportGrows() {
	t := n.t
	t.Helper()
	m := n.scrape()
	// pod-a twice (a restart), pod-b's two, pod-e, pod-k's big one, and
	// pod-req's, which NRI's validator refuses after the plugins ran.
	want := 5.0
	if n.v.class != "" {
		want++
	}
	if n.validator {
		want++
	}
	kept := 0.0
	if n.v.class != "" {
		kept = 1 // pod-k's small one
	}
	count := func(result string) float64 {
		return m[fmt.Sprintf("thin_snapshotter_nri_containers_total{result=%q}", result)]
	}
	if count("grown") != want || count("kept") != kept || count("refused") != 1 || count("failed") != 0 {
		t.Errorf("nri_containers_total: grown %v (want %v), kept %v (want %v), refused %v (want 1), failed %v (want 0)",
			count("grown"), want, count("kept"), kept, count("refused"), count("failed"))
	}
	if count := m["thin_snapshotter_nri_grow_duration_seconds_count"]; count > 0 {
		t.Logf("grow in the NRI hook (%s): %d grows, mean %.3fs", n.v.fsType, int(count), m["thin_snapshotter_nri_grow_duration_seconds_sum"]/count)
	}
	data, err := os.ReadFile(filepath.Join(n.s.dir, "thin.log"))
	if err != nil {
		t.Fatal(err)
	}
	field := func(line, name string) string {
		m := regexp.MustCompile(` ` + name + `=(\S+)`).FindStringSubmatch(line)
		if m == nil {
			return "?"
		}
		return m[1]
	}
	for line := range strings.Lines(string(data)) {
		if strings.Contains(line, `msg="nri: grew`) || strings.Contains(line, `msg="nri: kept`) {
			t.Logf("  container %.12s: %s bytes asked, %s -> %s bytes in %s", field(line, "container"), field(line, "asked"),
				field(line, "from"), field(line, "size"), field(line, "took"))
		}
	}
}

// teardown removes the pods and images as the kubelet would, and checks
// that the pool holds only the base device and that check finds nothing.
func (n *nriRun) teardown(pods []string, baseID string) {
	t, s, c := n.t, n.s, n.c
	t.Helper()
	for _, id := range pods {
		c.must(5*time.Minute, "stopp", id)
		c.must(5*time.Minute, "rmp", id)
	}
	c.must(5*time.Minute, "rmi", n.ref)
	var left []snapRow
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		left = s.listSnapshots()
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) != 0 {
		t.Fatalf("thin snapshots left after removing pods and images:\n%s", formatRows(left))
	}
	var ids []string
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		ids = thinDevices(t, n.dm, s.pool, s.tl.thinLs)
		if len(ids) == 1 || time.Now().After(deadline) {
			break
		}
	}
	if len(ids) != 1 || ids[0] != baseID {
		t.Errorf("pool holds %v after removal, want only the base device %s", ids, baseID)
	}
	if err := s.ctrd.Stop(time.Minute); err != nil {
		t.Errorf("containerd: %v", err)
	}
	if err := s.thin.Stop(time.Minute); err != nil {
		t.Errorf("thin-snapshotter did not exit cleanly: %v", err)
	}
	s.check("after the NRI run")
	s.checkOnlyPool(t, n.dm)
}
