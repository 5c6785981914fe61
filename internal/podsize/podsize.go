// Package podsize reads the disk size a Kubernetes pod asks for its
// containers from the pod's annotations.
//
// The keys follow NRI's convention for annotations that apply to a pod or
// to one of its containers (github.com/containerd/nri/pkg/plugin,
// GetEffectiveAnnotation), most specific first:
//
//	disk-size.thin-snapshotter.io/container.<name>: 37Gi   one container
//	disk-size.thin-snapshotter.io/pod: 50Gi                every container
//	disk-size.thin-snapshotter.io: 50Gi                    every container
//	containerd.io/snapshot/max-size: "53687091200"         every container
//
// Ours take Kubernetes quantities. The last is containerd's snapshot label,
// which containerd 2.4 copies from a pod's annotations to the pod sandbox's
// snapshot only; it keeps containerd's meaning (a whole number of bytes) and
// is read as the snapshotter reads the label, so both paths agree.
package podsize

import (
	"fmt"
	"math"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// Key is the annotation key of a disk size, to which "/container.<name>"
// or "/pod" is added.
const Key = "disk-size.thin-snapshotter.io"

// ContainerKey is the annotation key of container name's disk size. A key
// has at most 63 characters after its "/": container names up to 53.
func ContainerKey(name string) string { return Key + "/container." + name }

// PodKey is the annotation key of the disk size of every container of a
// pod.
const PodKey = Key + "/pod"

// Request is the annotation that sets a container's disk size.
type Request struct {
	Key, Value string
}

// Find returns the annotation that sets the disk size of container name,
// the most specific one of annotations; ok is false when none does.
func Find(annotations map[string]string, name string) (r Request, ok bool) {
	for _, k := range []string{ContainerKey(name), PodKey, Key, snapshots.LabelSnapshotMaxSize} {
		if v, ok := annotations[k]; ok {
			return Request{Key: k, Value: v}, true
		}
	}
	return Request{}, false
}

// Size is the size r asks for, in bytes. A bad value is InvalidArgument,
// and the error names the annotation.
func (r Request) Size() (uint64, error) {
	var (
		n   uint64
		err error
	)
	if r.Key == snapshots.LabelSnapshotMaxSize {
		n, err = snapshotter.ParseMaxSize(r.Value)
	} else {
		n, err = ParseQuantity(r.Value)
	}
	if err == nil && n == 0 {
		err = fmt.Errorf("a disk size of 0 bytes: %w", errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return 0, fmt.Errorf("annotation %s=%q: %w", r.Key, r.Value, err)
	}
	return n, nil
}

// ParseQuantity reads a Kubernetes quantity ("50Gi", "500M", "1.5Gi",
// "2147483648") that is a whole number of bytes.
func ParseQuantity(v string) (uint64, error) {
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0, fmt.Errorf("not a Kubernetes quantity such as 50Gi or 500M: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	switch {
	case q.Sign() < 0:
		return 0, fmt.Errorf("a negative size: %w", errdefs.ErrInvalidArgument)
	case q.CmpInt64(math.MaxInt64) >= 0:
		// Parsing caps binary quantities at MaxInt64 ("8Ei").
		return 0, fmt.Errorf("too large: %w", errdefs.ErrInvalidArgument)
	}
	// In range, Value is exact when the quantity is whole; it rounds a
	// fraction up.
	n := q.Value()
	if q.CmpInt64(n) != 0 {
		return 0, fmt.Errorf("not a whole number of bytes (m is milli: 500M or 500Mi?): %w", errdefs.ErrInvalidArgument)
	}
	return uint64(n), nil
}
