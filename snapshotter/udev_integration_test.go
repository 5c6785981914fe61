package snapshotter

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
)

const udevd = "/lib/systemd/systemd-udevd"

// startUdev runs systemd-udevd until the test ends and waits for its
// control socket (which dmsetup.Open looks for).
func startUdev(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(udevd); err != nil {
		t.Fatalf("%v (install Debian's udev package on the host)", err)
	}
	if _, err := os.Stat("/run/udev/control"); err == nil {
		t.Fatal("udev is already running; this test starts its own")
	}
	cmd := exec.Command(udevd)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(unix.SIGTERM)
		_ = cmd.Wait()
		_ = os.RemoveAll("/run/udev")
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat("/run/udev/control"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("systemd-udevd did not create /run/udev/control")
		}
	}
}

// udevProps waits until udev has processed a change event of dm-<minor>
// (the dm rules set DM_UDEV_RULES_VSN) and returns its properties.
// `udevadm settle` refuses to run in the VM's chroot, hence the polling.
func udevProps(t *testing.T, minor uint32) string {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		out, err := exec.Command("udevadm", "info", "--query=property", fmt.Sprintf("/dev/dm-%d", minor)).CombinedOutput()
		if err == nil && strings.Contains(string(out), "DM_UDEV_RULES_VSN=") {
			if _, err := os.Stat("/run/udev/queue"); os.IsNotExist(err) {
				return string(out)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("udev did not process dm-%d: %v\n%s", minor, err, out)
		}
	}
}

// byUUIDLinks lists the /dev/disk/by-uuid links that resolve to dm-<minor>.
func byUUIDLinks(t *testing.T, minor uint32) []string {
	t.Helper()
	var out []string
	entries, err := os.ReadDir("/dev/disk/by-uuid")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, e := range entries {
		dst, err := filepath.EvalSymlinks(filepath.Join("/dev/disk/by-uuid", e.Name()))
		if err == nil && dst == fmt.Sprintf("/dev/dm-%d", minor) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestIntegrationUdev: our devices carry a THIN- uuid and, with udev
// running, get their /dev/mapper node but no blkid probe and no
// /dev/disk/by-uuid link; a device made without our udev flags does get
// one (so the test can tell). Without udev the nodes are ours as before.
func TestIntegrationUdev(t *testing.T) {
	dmtest.Require(t)
	for _, withUdev := range []bool{false, true} {
		t.Run(fmt.Sprintf("udev=%v", withUdev), func(t *testing.T) {
			if withUdev {
				startUdev(t)
			}
			ctx := context.Background()
			root := t.TempDir()
			t.Cleanup(func() {
				if err := destroy(root); err != nil {
					t.Error(err)
				}
			})
			s, err := New(ctx, testConfig(root))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			m, err := s.Prepare(ctx, "a", "")
			if err != nil {
				t.Fatal(err)
			}
			a, err := s.ready(ctx, "a")
			if err != nil {
				t.Fatal(err)
			}
			name := s.deviceName(a.DeviceID)
			info, err := s.pool.Info(name)
			if err != nil {
				t.Fatal(err)
			}
			if want := dmsetup.DeviceUUID(s.pool.Name(), a.DeviceID); info.UUID != want || !strings.HasPrefix(info.UUID, dmsetup.UUIDPrefix) {
				t.Errorf("uuid %q, want %q", info.UUID, want)
			}
			var props string
			if withUdev {
				props = udevProps(t, info.Minor)
			}
			var st unix.Stat_t
			if err := unix.Stat(m[0].Source, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != unix.Mkdev(info.Major, info.Minor) {
				t.Fatalf("node %s: %v, mode %o, rdev %x", m[0].Source, err, st.Mode, st.Rdev)
			}
			if !withUdev {
				return
			}
			if links := byUUIDLinks(t, info.Minor); len(links) != 0 {
				t.Errorf("by-uuid links to our device: %v", links)
			}
			if !strings.Contains(props, "DM_UDEV_DISABLE_DISK_RULES_FLAG=1") || strings.Contains(props, "ID_FS_UUID=") {
				t.Errorf("udev properties of our device:\n%s", props)
			}
			if !strings.Contains(props, "DEVLINKS=") || !strings.Contains(props, "/dev/mapper/"+name) {
				t.Errorf("udev made no /dev/mapper link for %s:\n%s", name, props)
			}

			// The same thin device made writable as `dmsetup create` makes
			// devices (a primary-source cookie without our disable flags)
			// is probed: the checks above can fail. (A device resumed with
			// no cookie at all keeps the flags the rules gave its "add"
			// event, which on Debian's rules disable probing too; the
			// explicit flags do not depend on that.)
			c, err := dmsetup.Open(dmsetup.WithUdevFlags(dmsetup.UdevPrimarySource))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := s.Commit(ctx, "c", "a"); err != nil {
				t.Fatal(err)
			}
			tbl, err := dmsetup.ThinTable(dmsetup.BytesToSectors(a.Size), s.pool.(*dmPool).PoolDevice(), a.DeviceID, "")
			if err != nil {
				t.Fatal(err)
			}
			plain := s.pool.Name() + "-plain"
			if err := c.Create(plain, []dmsetup.Target{tbl}, dmsetup.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := c.Remove(ctx, plain, dmsetup.RemoveOptions{}); err != nil {
					t.Error(err)
				}
			}()
			pinfo, err := c.Info(plain)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("device without our flags:\n%s", udevProps(t, pinfo.Minor))
			if links := byUUIDLinks(t, pinfo.Minor); len(links) == 0 {
				t.Errorf("a device without our flags got no by-uuid link either: the test shows nothing")
			}
		})
	}
}
