package dmsetup

import (
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Error is a failed device-mapper operation. Err is usually the
// syscall.Errno the kernel returned.
type Error struct {
	Op     string // e.g. "create", "table load", `message "delete 7"`
	Device string // device name, empty for global operations
	Err    error
}

func (e *Error) Error() string {
	if e.Device == "" {
		return fmt.Sprintf("device-mapper %s: %v", e.Op, e.Err)
	}
	return fmt.Sprintf("device-mapper %s %s: %v", e.Op, e.Device, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// opCreate is the Op of errors from Create's DEV_CREATE step.
const opCreate = "create"

// Is maps kernel errnos onto containerd errdefs kinds so that callers can
// use errdefs.IsNotFound and friends without knowing errnos.
func (e *Error) Is(target error) bool {
	var errno unix.Errno
	if !errors.As(e.Err, &errno) {
		return false
	}
	switch target {
	case errdefs.ErrNotFound:
		return errno == unix.ENXIO || errno == unix.ENODATA
	case errdefs.ErrAlreadyExists:
		// The kernel refuses a taken device name or uuid with EBUSY.
		return errno == unix.EEXIST || (e.Op == opCreate && errno == unix.EBUSY)
	case errdefs.ErrInvalidArgument:
		return errno == unix.EINVAL
	}
	return false
}

// opError wraps a failure of op on device dev in an *Error; a nil err
// stays nil, so callers can wrap whatever a call returned.
func opError(op, dev string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Device: dev, Err: err}
}

// ErrMalformed is matched (errors.Is) by parse failures of kernel replies,
// status and table lines.
var ErrMalformed = errors.New("malformed device-mapper data")

// IsNotFound reports whether err says the device (ENXIO) or the thin device
// id (ENODATA) does not exist.
func IsNotFound(err error) bool {
	return errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODATA)
}

// IsExist reports whether err says the thin id (EEXIST) or the device name
// or uuid (EBUSY from create) already exists.
func IsExist(err error) bool { return errdefs.IsAlreadyExists(err) }

// IsBusy reports whether err says the device is in use.
func IsBusy(err error) bool { return errors.Is(err, unix.EBUSY) }
