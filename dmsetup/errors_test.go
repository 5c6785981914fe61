package dmsetup

import (
	"errors"
	"fmt"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

func TestErrorMatching(t *testing.T) {
	for _, tc := range []struct {
		errno                           unix.Errno
		notFound, exists, invalid, busy bool
	}{
		{unix.ENXIO, true, false, false, false},
		{unix.ENODATA, true, false, false, false},
		{unix.EEXIST, false, true, false, false},
		{unix.EINVAL, false, false, true, false},
		{unix.EBUSY, false, false, false, true},
		{unix.EPERM, false, false, false, false},
	} {
		// Wrapped once more, as callers do.
		err := fmt.Errorf("snapshot x: %w", opError("message \"create_thin 1\"", "pool", tc.errno))
		if !errors.Is(err, tc.errno) {
			t.Errorf("%v: errors.Is(errno) false", tc.errno)
		}
		var e *Error
		if !errors.As(err, &e) || e.Device != "pool" {
			t.Errorf("%v: errors.As gave %+v", tc.errno, e)
		}
		for _, c := range []struct {
			name      string
			got, want bool
		}{
			{"errdefs.IsNotFound", errdefs.IsNotFound(err), tc.notFound},
			{"IsNotFound", IsNotFound(err), tc.notFound},
			{"errdefs.IsAlreadyExists", errdefs.IsAlreadyExists(err), tc.exists},
			{"IsExist", IsExist(err), tc.exists},
			{"errdefs.IsInvalidArgument", errdefs.IsInvalidArgument(err), tc.invalid},
			{"IsBusy", IsBusy(err), tc.busy},
		} {
			if c.got != c.want {
				t.Errorf("%v: %s = %v", tc.errno, c.name, c.got)
			}
		}
	}
}

func TestCreateBusyIsExist(t *testing.T) {
	// DEV_CREATE of a taken name fails with EBUSY.
	err := opError(opCreate, "thin-1", unix.EBUSY)
	if !errors.Is(err, unix.EBUSY) || !IsExist(err) || !errdefs.IsAlreadyExists(err) {
		t.Errorf("create EBUSY: %v", err)
	}
	if err := opError("remove", "thin-1", unix.EBUSY); IsExist(err) {
		t.Errorf("remove EBUSY counted as exists")
	}
}

func TestErrorMessage(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{opError("remove", "thin-7", unix.EBUSY), "device-mapper remove thin-7: device or resource busy"},
		{opError("list", "", unix.EPERM), "device-mapper list: operation not permitted"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("got %q want %q", got, tc.want)
		}
	}
	if opError("x", "y", nil) != nil {
		t.Error("opError(nil) not nil")
	}
}

func TestCheckName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"pool", true}, {"thin-1_a.b", true}, {string(make([]byte, 127)), false},
		{"", false}, {".", false}, {"..", false}, {"a/b", false}, {"../control", false},
		{"x\x00y", false},
	} {
		if err := checkName(tc.name); (err == nil) != tc.ok {
			t.Errorf("%q: %v", tc.name, err)
		} else if err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("%q: %v not EINVAL", tc.name, err)
		}
	}
	long := make([]byte, 127)
	for i := range long {
		long[i] = 'a'
	}
	if err := checkName(string(long)); err != nil {
		t.Errorf("127-byte name rejected: %v", err)
	}
	if err := checkName(string(long) + "a"); err == nil {
		t.Error("128-byte name accepted")
	}
}
