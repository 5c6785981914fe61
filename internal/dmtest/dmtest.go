// Package dmtest holds helpers for tests that need root and a kernel with
// dm-thin: they skip on hosts without it and fail inside the VM bench.
package dmtest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

// RequireEnv is set to 1 by the VM bench (test/vm/run) and by
// `make test-integration`: there a missing device-mapper is a failure.
const RequireEnv = "THIN_TEST_REQUIRE_DM"

// Require skips tb on hosts without root or dm-thin, and fails it when
// RequireEnv is 1.
func Require(tb testing.TB) {
	tb.Helper()
	missing := func(why string) {
		tb.Helper()
		if os.Getenv(RequireEnv) == "1" {
			tb.Fatalf("real device-mapper required (%s=1): %s", RequireEnv, why)
		}
		tb.Skipf("no device-mapper: %s", why)
	}
	if os.Geteuid() != 0 {
		missing("not root")
	}
	c, err := dmsetup.Open()
	if err != nil {
		missing(err.Error())
	}
	defer c.Close()
	if _, err := c.TargetVersion("thin-pool"); err != nil {
		missing(err.Error())
	}
}

// RemoveDevices removes every dm device whose name starts with prefix.
func RemoveDevices(ctx context.Context, prefix string) error {
	c, err := dmsetup.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	devs, err := c.List()
	if err != nil {
		return err
	}
	for _, d := range devs {
		if strings.HasPrefix(d.Name, prefix) {
			if err := c.Remove(ctx, d.Name, dmsetup.RemoveOptions{}); err != nil {
				return err
			}
		}
	}
	return nil
}

// DestroyLoopPool removes the thin devices of pool (dmsetup.DeviceName), the loopback
// pool itself, its loop devices and files in dir. The daemon whose root
// holds dir leaves its image filesystem mirror mounted when it stops:
// that goes too (imagefs.Remove), so the root can be deleted.
func DestroyLoopPool(ctx context.Context, pool, dir string) error {
	if err := imagefs.Remove(filepath.Dir(dir)); err != nil {
		return err
	}
	if err := RemoveDevices(ctx, dmsetup.DeviceNamePrefix(pool)); err != nil {
		return err
	}
	c, err := dmsetup.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	lp, err := dmsetup.CreateLoopPool(ctx, c, dmsetup.LoopPoolConfig{Dir: dir, Name: pool})
	if err != nil {
		return err
	}
	return lp.Destroy(ctx)
}
