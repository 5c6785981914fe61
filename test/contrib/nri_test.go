package contrib

import (
	"os"
	"path"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/internal/podsize"
)

// The DaemonSet mounts the host's NRI socket directory at the same path,
// where the daemon's configuration looks for the socket.
func TestKubernetesManifestNRI(t *testing.T) {
	o := decodeManifest(t)
	cfg, err := config.Parse([]byte(o.configMap.Data["config.toml"]))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.NRI.Enable {
		t.Fatal("the ConfigMap turns NRI off: pod disk sizes would be ignored")
	}
	dir := path.Dir(cfg.NRI.SocketPath)
	pod := o.daemonSet.Spec.Template.Spec
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	for _, m := range pod.Containers[0].VolumeMounts {
		if m.MountPath != dir {
			continue
		}
		v := volumes[m.Name]
		if v.HostPath == nil || v.HostPath.Path != dir || m.ReadOnly {
			t.Errorf("%s is mounted from %+v (read-only %v), want the host's %s, writable (a socket is dialled)", dir, v.VolumeSource, m.ReadOnly, dir)
		}
		return
	}
	t.Errorf("the NRI socket's directory %s is not mounted", dir)
}

// The example pod decodes strictly, runs on a thin RuntimeClass, and every
// container's size annotation parses as the daemon parses it; container
// annotations name containers of the pod.
func TestKubernetesDiskSizePod(t *testing.T) {
	data, err := os.ReadFile("../../contrib/kubernetes/pod-disk-size.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := decodeStrict(data, &pod); err != nil {
		t.Fatal(err)
	}
	classes := runtimeClasses(t)
	if pod.Spec.RuntimeClassName == nil || !slices.Contains(classes, *pod.Spec.RuntimeClassName) {
		t.Errorf("runtimeClassName %v is not one of runtimeclass.yaml's %q", pod.Spec.RuntimeClassName, classes)
	}
	var names []string
	sizes := map[uint64]bool{}
	for _, c := range pod.Spec.Containers {
		names = append(names, c.Name)
		r, ok := podsize.Find(pod.Annotations, c.Name)
		if !ok {
			t.Errorf("container %s asks for no size", c.Name)
			continue
		}
		n, err := r.Size()
		if err != nil {
			t.Errorf("container %s: %v", c.Name, err)
		}
		sizes[n] = true
	}
	if len(sizes) < 2 {
		t.Errorf("the containers ask for sizes %v: the example should show a pod's size and a container's own", sizes)
	}
	for k := range pod.Annotations {
		if name, ok := strings.CutPrefix(k, podsize.ContainerKey("")); ok && !slices.Contains(names, name) {
			t.Errorf("annotation %s names no container of the pod (%q)", k, names)
		}
	}
}

// runtimeClasses are the names of runtimeclass.yaml's RuntimeClasses.
func runtimeClasses(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile("../../contrib/kubernetes/runtimeclass.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for doc := range strings.SplitSeq(string(data), "\n---\n") {
		var rc nodev1.RuntimeClass
		if err := decodeStrict([]byte(doc), &rc); err != nil {
			t.Fatal(err)
		}
		names = append(names, rc.Name)
	}
	return names
}
