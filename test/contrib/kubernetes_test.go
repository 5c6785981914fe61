package contrib

import (
	"bytes"
	"errors"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

const manifest = "../../contrib/kubernetes/thin-snapshotter.yaml"

// objects are the manifest's documents, each decoded strictly into its
// k8s.io/api type: an unknown or misspelt field fails here instead of being
// dropped by the API server's defaulting or refused by kubectl.
type objects struct {
	namespace *corev1.Namespace
	configMap *corev1.ConfigMap
	daemonSet *appsv1.DaemonSet
}

func decodeManifest(t *testing.T) objects {
	t.Helper()
	data, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	var o objects
	for i, doc := range bytes.Split(data, []byte("\n---\n")) {
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatalf("document %d: %v", i, err)
		}
		var into any
		switch gvk := meta.APIVersion + " " + meta.Kind; gvk {
		case "v1 Namespace":
			o.namespace = &corev1.Namespace{}
			into = o.namespace
		case "v1 ConfigMap":
			o.configMap = &corev1.ConfigMap{}
			into = o.configMap
		case "apps/v1 DaemonSet":
			o.daemonSet = &appsv1.DaemonSet{}
			into = o.daemonSet
		default:
			t.Fatalf("document %d: unexpected %q", i, gvk)
		}
		if err := decodeStrict(doc, into); err != nil {
			t.Fatalf("document %d (%s): %v", i, meta.Kind, err)
		}
	}
	if o.namespace == nil || o.configMap == nil || o.daemonSet == nil {
		t.Fatalf("want a Namespace, a ConfigMap and a DaemonSet, got %+v", o)
	}
	return o
}

// decodeStrict decodes a YAML document as the API server reads JSON: field
// names match case-sensitively, and unknown or repeated fields are errors.
// (encoding/json, under yaml.UnmarshalStrict, would take "hostPid" for
// hostPID.)
func decodeStrict(doc []byte, into any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := sigsjson.UnmarshalStrict(j, into, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// The strict decoding itself: misspelt, unknown and repeated fields are
// refused.
func TestManifestDecodingIsStrict(t *testing.T) {
	const head = "apiVersion: apps/v1\nkind: DaemonSet\nspec:\n  template:\n    spec:\n"
	for _, tt := range []struct{ doc, want string }{
		{head + "      hostPid: true\n", "hostPid"},
		{head + "      hostPIDs: true\n", "hostPIDs"},
		{head + "      hostPID: true\n      hostPID: false\n", "hostPID"},
	} {
		if err := decodeStrict([]byte(tt.doc), &appsv1.DaemonSet{}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q accepted: %v", tt.doc, err)
		}
	}
	if err := decodeStrict([]byte(head+"      hostPID: true\n"), &appsv1.DaemonSet{}); err != nil {
		t.Errorf("a valid document refused: %v", err)
	}
}

func TestKubernetesManifest(t *testing.T) {
	o := decodeManifest(t)
	ds, cm := o.daemonSet, o.configMap
	ns := o.namespace.Name
	if cm.Namespace != ns || ds.Namespace != ns {
		t.Errorf("namespaces: ConfigMap %q, DaemonSet %q, want %q", cm.Namespace, ds.Namespace, ns)
	}

	// The configuration parses strictly and validates, as the daemon would.
	text, ok := cm.Data["config.toml"]
	if !ok {
		t.Fatal("ConfigMap has no config.toml")
	}
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		t.Fatalf("config.toml: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config.toml: %v", err)
	}

	sel := ds.Spec.Selector
	if sel == nil || len(sel.MatchLabels) == 0 {
		t.Fatal("no selector")
	}
	pod := ds.Spec.Template
	for k, v := range sel.MatchLabels {
		if pod.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod's labels %v", k, v, pod.Labels)
		}
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	if sc := c.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Error("the daemon's container is not privileged")
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = v
	}
	// mountedFrom is the volume mounted at dir in the container.
	mountedFrom := func(dir string) (corev1.Volume, bool) {
		for _, m := range c.VolumeMounts {
			if m.MountPath == dir {
				v, ok := volumes[m.Name]
				if !ok {
					t.Errorf("mount %s names no volume %q", dir, m.Name)
				}
				return v, ok
			}
		}
		return corev1.Volume{}, false
	}
	// The host paths the daemon and containerd share, at the same paths,
	// so the device paths and the socket it hands out mean the same thing
	// on the host.
	for _, dir := range []string{"/dev", path.Dir(cfg.Address), cfg.Root, "/lib/modules", "/run/udev"} {
		v, ok := mountedFrom(dir)
		switch {
		case !ok:
			t.Errorf("%s is not mounted", dir)
		case v.HostPath == nil || v.HostPath.Path != dir:
			t.Errorf("%s is mounted from %+v, want host path %s", dir, v.VolumeSource, dir)
		}
	}
	// The image filesystem mirror the daemon mounts under its root must
	// reach the host, where containerd reports it and the kubelet reads it.
	if !cfg.ImageFS.Mirror {
		t.Error("the ConfigMap turns the image filesystem mirror off")
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == cfg.Root && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
			t.Errorf("%s is mounted with propagation %v, want Bidirectional: the image filesystem mirror under %s would stay in the pod",
				cfg.Root, m.MountPropagation, imagefs.Dir(cfg.Root))
		}
	}

	// --config names config.toml in the ConfigMap's mount.
	i := slices.Index(c.Command, "--config")
	if i < 0 || i+1 >= len(c.Command) {
		t.Fatalf("command %q has no --config", c.Command)
	}
	file := c.Command[i+1]
	v, ok := mountedFrom(filepath.Dir(file))
	if !ok || v.ConfigMap == nil || v.ConfigMap.Name != cm.Name || filepath.Base(file) != "config.toml" {
		t.Errorf("--config %s is not config.toml of ConfigMap %s (volume %+v)", file, cm.Name, v.VolumeSource)
	}

	// Ready when the daemon answers on the socket containerd is pointed at.
	p := c.ReadinessProbe
	if p == nil || p.Exec == nil || !slices.Equal(p.Exec.Command, []string{"thin-snapshotter", "--address", cfg.Address, "status"}) {
		t.Errorf("readiness probe %+v does not ask the daemon on %s for its status", p, cfg.Address)
	}

	// The module loader sees the host's modules.
	if len(pod.Spec.InitContainers) != 1 {
		t.Fatalf("%d init containers, want 1 (modprobe)", len(pod.Spec.InitContainers))
	}
	ic := pod.Spec.InitContainers[0]
	if !slices.Equal(ic.Command, []string{"modprobe", "dm_thin_pool"}) {
		t.Errorf("init container command %q", ic.Command)
	}
	found := false
	for _, m := range ic.VolumeMounts {
		found = found || (m.MountPath == "/lib/modules" && volumes[m.Name].HostPath != nil && volumes[m.Name].HostPath.Path == "/lib/modules")
	}
	if !found {
		t.Error("init container does not mount the host's /lib/modules")
	}
}

// The RuntimeClasses name runtime handlers and schedule onto the nodes the
// DaemonSet runs on.
func TestKubernetesRuntimeClasses(t *testing.T) {
	data, err := os.ReadFile("../../contrib/kubernetes/runtimeclass.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ds := decodeManifest(t).daemonSet
	var handlers []string
	for i, doc := range bytes.Split(data, []byte("\n---\n")) {
		var rc nodev1.RuntimeClass
		if err := decodeStrict(doc, &rc); err != nil {
			t.Fatalf("document %d: %v", i, err)
		}
		if rc.APIVersion != "node.k8s.io/v1" || rc.Kind != "RuntimeClass" || rc.Handler == "" {
			t.Fatalf("document %d: %s %s handler %q", i, rc.APIVersion, rc.Kind, rc.Handler)
		}
		if rc.Scheduling == nil {
			t.Errorf("RuntimeClass %s does not keep its pods on thin nodes", rc.Name)
			continue
		}
		for k, v := range rc.Scheduling.NodeSelector {
			if ds.Spec.Template.Spec.NodeSelector[k] != v {
				t.Errorf("RuntimeClass %s selects %s=%s, which the DaemonSet does not", rc.Name, k, v)
			}
		}
		handlers = append(handlers, rc.Handler)
	}
	if !slices.Equal(handlers, []string{"runc-thin", "kata-thin", "runc-thin-50g"}) {
		t.Errorf("handlers %q", handlers)
	}
	// Each handler is one of containerd's, in both contrib configs, on a
	// snapshotter that is one of thin-snapshotter's sockets there: thin or
	// a size class.
	for _, file := range []string{"config-v3.toml", "config-v4.toml"} {
		data, err := os.ReadFile(filepath.Join("../../contrib/containerd", file))
		if err != nil {
			t.Fatal(err)
		}
		var c struct {
			ProxyPlugins map[string]struct {
				Type    string `toml:"type"`
				Address string `toml:"address"`
			} `toml:"proxy_plugins"`
			Plugins struct {
				Runtime struct {
					Containerd struct {
						Runtimes map[string]struct {
							Snapshotter string `toml:"snapshotter"`
						} `toml:"runtimes"`
					} `toml:"containerd"`
				} `toml:"io.containerd.cri.v1.runtime"`
			} `toml:"plugins"`
		}
		if err := toml.Unmarshal(data, &c); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		for _, h := range handlers {
			rt, ok := c.Plugins.Runtime.Containerd.Runtimes[h]
			pp := c.ProxyPlugins[rt.Snapshotter]
			if !ok || pp.Type != "snapshot" || path.Dir(pp.Address) != path.Dir(config.DefaultAddress) {
				t.Errorf("%s: runtime handler %s is %+v (present %v) on proxy plugin %+v, want one on a thin-snapshotter socket", file, h, rt, ok, pp)
			}
		}
	}
}
