//go:build linux

package dmsetup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// requireDMEnv makes tests that need the real kernel fail instead of skip;
// the VM bench sets it.
const requireDMEnv = "THIN_TEST_REQUIRE_DM"

// requireDM returns a client for the real kernel, or skips the test when the
// host has no device-mapper (fails instead under THIN_TEST_REQUIRE_DM=1). It
// also registers a check that the test leaves no dm or loop devices behind.
func requireDM(tb testing.TB) *Client {
	tb.Helper()
	missing := func(format string, args ...any) {
		tb.Helper()
		if os.Getenv(requireDMEnv) == "1" {
			tb.Fatalf("device-mapper required (%s=1): "+format, append([]any{requireDMEnv}, args...)...)
		}
		tb.Skipf("no device-mapper: "+format, args...)
	}
	if os.Geteuid() != 0 {
		missing("not root")
	}
	if _, err := os.Stat(controlPath); err != nil {
		if _, err2 := os.Stat(controlDevFile); err2 != nil {
			missing("%v", err)
		}
	}
	c, err := Open()
	if err != nil {
		missing("%v", err)
	}
	if _, err := c.TargetVersion("thin-pool"); err != nil {
		c.Close()
		missing("thin-pool target: %v", err)
	}
	// Cleanups run last-in first-out: the leak check needs the client.
	tb.Cleanup(func() { c.Close() })
	checkNoLeaks(tb, c)
	return c
}

// checkNoLeaks records the dm devices and bound loop devices present now and
// fails the test if more remain when it ends.
func checkNoLeaks(tb testing.TB, c *Client) {
	tb.Helper()
	devsBefore := dmNames(tb, c)
	loopsBefore := boundLoops()
	tb.Cleanup(func() {
		// Loop autoclear runs on the last close; give it a moment.
		deadline := time.Now().Add(5 * time.Second)
		for {
			extraDevs := diff(dmNames(tb, c), devsBefore)
			extraLoops := diff(boundLoops(), loopsBefore)
			if len(extraDevs) == 0 && len(extraLoops) == 0 {
				return
			}
			if time.Now().After(deadline) {
				tb.Errorf("left behind: dm devices %v, loop devices %v", extraDevs, extraLoops)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

func dmNames(tb testing.TB, c *Client) []string {
	devs, err := c.List()
	if err != nil {
		tb.Errorf("list: %v", err)
		return nil
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	return names
}

// boundLoops lists "loopN=backing file" for every attached loop device.
func boundLoops() []string {
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		out = append(out, filepath.Base(filepath.Dir(filepath.Dir(p)))+"="+strings.TrimSpace(string(b)))
	}
	return out
}

func diff(now, before []string) []string {
	var out []string
	for _, n := range now {
		if !slices.Contains(before, n) {
			out = append(out, n)
		}
	}
	return out
}

var nameSeq atomic.Int64

// devName returns a dm name unique to this process.
func devName(what string) string {
	return fmt.Sprintf("dmtest-%d-%d-%s", os.Getpid(), nameSeq.Add(1), what)
}

const (
	testDataSize = 256 << 20
	testMetaSize = 16 << 20
	thinSectors  = 64 << 20 / SectorSize
)

// newLoopPool creates a small pool on loop devices and destroys it (and its
// files) when the test ends.
func newLoopPool(tb testing.TB, c *Client) *LoopPool {
	tb.Helper()
	p, err := CreateLoopPool(context.Background(), c, LoopPoolConfig{
		Dir:          tb.TempDir(),
		Name:         devName("pool"),
		DataSize:     testDataSize,
		MetadataSize: testMetaSize,
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := p.Destroy(context.Background()); err != nil {
			tb.Errorf("destroy pool: %v", err)
		}
		for _, f := range []string{p.DataFile, p.MetadataFile} {
			if _, err := os.Stat(f); !os.IsNotExist(err) {
				tb.Errorf("pool file %s left behind: %v", f, err)
			}
		}
	})
	return p
}

// activateThin creates dm device name for thin id of pool and removes it at
// the end of the test if it still exists.
func activateThin(tb testing.TB, c *Client, pool *LoopPool, name string, id uint32) string {
	tb.Helper()
	tg, err := ThinTable(thinSectors, pool.DevicePath, id, "")
	if err != nil {
		tb.Fatal(err)
	}
	if err := c.Create(name, []Target{tg}, CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { removeIfExists(tb, c, name) })
	return c.DevicePath(name)
}

func removeIfExists(tb testing.TB, c *Client, name string) {
	tb.Helper()
	if err := c.Remove(context.Background(), name, RemoveOptions{}); err != nil && !errors.Is(err, unix.ENXIO) {
		tb.Errorf("cleanup: %v", err)
	}
}

func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("%s %q: %v\n%s%s", name, args, err, out.String(), stderr.String())
	}
	return out.String()
}

func mkfs(tb testing.TB, dev string) {
	tb.Helper()
	run(tb, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", dev)
}

// mount mounts dev on a fresh directory, unmounted at the end of the test
// unless the test unmounts it first.
func mount(tb testing.TB, dev string) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := unix.Mount(dev, dir, "ext4", 0, ""); err != nil {
		tb.Fatalf("mount %s: %v", dev, err)
	}
	tb.Cleanup(func() { _ = unix.Unmount(dir, 0) })
	return dir
}

func unmount(tb testing.TB, dir string) {
	tb.Helper()
	if err := unix.Unmount(dir, 0); err != nil {
		tb.Fatalf("unmount %s: %v", dir, err)
	}
}

func haveCLI() bool {
	_, err := exec.LookPath("dmsetup")
	return err == nil
}

// version returns the dm ioctl interface version of the kernel.
func (c *Client) version() (Version, error) {
	req, err := newRequest("", 0, 0)
	if err != nil {
		return Version{}, err
	}
	rep, err := c.ioctl(unix.DM_VERSION, req)
	if err != nil {
		return Version{}, opError("version", "", err)
	}
	return rep.version(), nil
}

// atLeast reports whether v >= o.
func (v Version) atLeast(o Version) bool {
	if v.Major != o.Major {
		return v.Major > o.Major
	}
	if v.Minor != o.Minor {
		return v.Minor > o.Minor
	}
	return v.Patch >= o.Patch
}
