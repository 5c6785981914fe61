package dmsetup

import (
	"errors"
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
)

// LVM names its logical volumes' dm devices "<vg>-<lv>", with every '-'
// inside either name doubled so the separator stays unambiguous, and the
// hidden layers under them "<vg>-<lv>-<layer>". A thin pool without thin
// volumes is the thin-pool target itself; once it has thin volumes, LVM
// activates the target as the "-tpool" layer and "<vg>-<lv>" becomes a
// wrapper over it.
const lvmThinPoolLayer = "-tpool"

// maxLVMName is LVM's limit on a volume group or logical volume name.
const maxLVMName = 127

// ParseLVMName splits "vg/lv" into its volume group and logical volume
// names, checked by LVM's rules for names: letters, digits and "+_.-", not
// starting with '-', not "." or "..", and a dm name that fits.
func ParseLVMName(s string) (vg, lv string, err error) {
	vg, lv, ok := strings.Cut(s, "/")
	if !ok {
		return "", "", fmt.Errorf("%q is not vg/lv", s)
	}
	for _, n := range []string{vg, lv} {
		if msg := checkLVMName(n); msg != "" {
			return "", "", fmt.Errorf("%q: %q %s", s, n, msg)
		}
	}
	if n := len(LVMDeviceName(vg, lv) + lvmThinPoolLayer); n >= nameLen {
		return "", "", fmt.Errorf("%q: its dm name would be %d bytes, longer than %d", s, n, nameLen-1)
	}
	return vg, lv, nil
}

// checkLVMName returns why n is not a valid LVM volume group or logical
// volume name, or "".
func checkLVMName(n string) string {
	switch {
	case n == "":
		return "is empty"
	case len(n) > maxLVMName:
		return fmt.Sprintf("is longer than %d bytes", maxLVMName)
	case n == "." || n == "..":
		return "is not a name"
	case n[0] == '-':
		return "starts with '-'"
	}
	for _, r := range n {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("+_.-", r)) {
			return "may hold only letters, digits and \"+_.-\""
		}
	}
	return ""
}

// LVMDeviceName is the dm name LVM gives logical volume lv of volume group
// vg.
func LVMDeviceName(vg, lv string) string {
	return strings.ReplaceAll(vg, "-", "--") + "-" + strings.ReplaceAll(lv, "-", "--")
}

// LVMThinPoolNames are the dm names under which LVM's thin pool vg/lv may
// carry its thin-pool target: the "-tpool" layer (the pool has thin
// volumes) and the volume's own name (it has none).
func LVMThinPoolNames(vg, lv string) []string {
	n := LVMDeviceName(vg, lv)
	return []string{n + lvmThinPoolLayer, n}
}

// FindThinPool returns the first of names that is a device whose live
// table is one thin-pool target. NotFound when none is.
func (c *Client) FindThinPool(names ...string) (string, error) {
	var why []string
	for _, n := range names {
		_, err := c.singleTarget(n, "thin-pool")
		switch {
		case err == nil:
			return n, nil
		case IsNotFound(err):
			why = append(why, n+": no such device")
		case errors.Is(err, ErrMalformed):
			why = append(why, err.Error())
		default:
			return "", err
		}
	}
	return "", fmt.Errorf("no thin-pool device (%s): %w", strings.Join(why, "; "), errdefs.ErrNotFound)
}
