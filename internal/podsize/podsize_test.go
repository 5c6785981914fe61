package podsize

import (
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"k8s.io/apimachinery/pkg/util/validation"
)

func TestFind(t *testing.T) {
	const maxSize = "containerd.io/snapshot/max-size"
	all := map[string]string{
		"disk-size.thin-snapshotter.io/container.app": "37Gi",
		"disk-size.thin-snapshotter.io/pod":           "50Gi",
		"disk-size.thin-snapshotter.io":               "60Gi",
		maxSize:                                       "1073741824",
		"other.example.com/pod":                       "1Gi",
	}
	without := func(keys ...string) map[string]string {
		m := maps.Clone(all)
		for _, k := range keys {
			delete(m, k)
		}
		return m
	}
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		container   string
		want        Request
		ok          bool
	}{
		{"the container's own", all, "app", Request{"disk-size.thin-snapshotter.io/container.app", "37Gi"}, true},
		{"another container: the pod's", all, "sidecar", Request{"disk-size.thin-snapshotter.io/pod", "50Gi"}, true},
		{"the bare key", without("disk-size.thin-snapshotter.io/pod"), "sidecar", Request{"disk-size.thin-snapshotter.io", "60Gi"}, true},
		{"containerd's label last", without("disk-size.thin-snapshotter.io/pod", "disk-size.thin-snapshotter.io"), "sidecar", Request{maxSize, "1073741824"}, true},
		{"none", map[string]string{"other.example.com/pod": "1Gi"}, "app", Request{}, false},
		{"no annotations", nil, "app", Request{}, false},
		{"a bad value is still found", map[string]string{PodKey: "lots"}, "app", Request{PodKey, "lots"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := Find(tc.annotations, tc.container)
			if got != tc.want || ok != tc.ok {
				t.Errorf("Find = %+v, %v; want %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestSize(t *testing.T) {
	for _, tc := range []struct {
		key, value string
		want       uint64
		err        string // in the message, besides the key
	}{
		{PodKey, "2Gi", 2 << 30, ""},
		{PodKey, "500M", 500e6, ""},
		{PodKey, "1.5Gi", 1536 << 20, ""},
		{PodKey, "2147483648", 2 << 30, ""},
		{PodKey, "1e9", 1e9, ""},
		{PodKey, "8Ei", 0, "too large"},
		{PodKey, "1e19", 0, "too large"},
		{ContainerKey("app"), "37Gi", 37 << 30, ""},
		{PodKey, "500m", 0, "whole number of bytes"},
		{PodKey, "0.5", 0, "whole number of bytes"},
		{PodKey, "0", 0, "0 bytes"},
		{PodKey, "-1Gi", 0, "negative"},
		{PodKey, "lots", 0, "not a Kubernetes quantity"},
		{PodKey, "2 Gi", 0, "not a Kubernetes quantity"},
		{PodKey, "2gi", 0, "not a Kubernetes quantity"},
		{PodKey, "", 0, "not a Kubernetes quantity"},
		// containerd's label: bytes, as the snapshotter reads it.
		{"containerd.io/snapshot/max-size", "1073741824", 1 << 30, ""},
		{"containerd.io/snapshot/max-size", "1Gi", 0, "not a size in bytes"},
		{"containerd.io/snapshot/max-size", "0", 0, "0 bytes"},
	} {
		t.Run(tc.key+"="+tc.value, func(t *testing.T) {
			got, err := Request{Key: tc.key, Value: tc.value}.Size()
			if tc.err == "" {
				if err != nil || got != tc.want {
					t.Fatalf("Size = %d, %v; want %d", got, err, tc.want)
				}
				return
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.err) ||
				!strings.Contains(err.Error(), "annotation "+tc.key+"=") {
				t.Fatalf("Size = %d, %v; want InvalidArgument naming %s and saying %q", got, err, tc.key, tc.err)
			}
		})
	}
}

// The keys are valid Kubernetes annotation keys (qualified names), the
// container key for names up to 53 characters.
func TestKeysAreAnnotationKeys(t *testing.T) {
	for _, k := range []string{Key, PodKey, ContainerKey("app"), ContainerKey(strings.Repeat("a", 53))} {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			t.Errorf("%q is not an annotation key: %v", k, errs)
		}
	}
	if errs := validation.IsQualifiedName(ContainerKey(strings.Repeat("a", 54))); len(errs) == 0 {
		t.Errorf("the key of a 54-character container name is valid: the documented limit is wrong")
	}
}
