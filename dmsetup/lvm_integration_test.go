package dmsetup

import (
	"testing"

	"github.com/containerd/errdefs"
)

// FindThinPool picks the thin-pool device among LVM's two layouts: the
// wrapper named like the volume (a linear table over the pool, as LVM makes
// it once the pool has thin volumes) is passed over for the target.
func TestIntegrationFindThinPool(t *testing.T) {
	c := requireDM(t)
	pool := newLoopPool(t, c)
	wrapper := devName("wrapper")
	if err := c.Create(wrapper, []Target{{Start: 0, Length: 8192, Type: "linear", Params: pool.DevicePath + " 0"}}, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeIfExists(t, c, wrapper) })
	missing := devName("missing")

	for _, tt := range []struct {
		names []string
		want  string
	}{
		{[]string{pool.Name, wrapper}, pool.Name},
		{[]string{wrapper, pool.Name}, pool.Name},
		{[]string{missing, pool.Name}, pool.Name},
		{[]string{missing, wrapper}, ""},
	} {
		got, err := c.FindThinPool(tt.names...)
		if tt.want == "" {
			if !errdefs.IsNotFound(err) {
				t.Errorf("FindThinPool(%q) = %q, %v; want NotFound", tt.names, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("FindThinPool(%q) = %q, %v; want %q", tt.names, got, err, tt.want)
		}
	}
}
