//go:build linux

package dmsetup

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkIntegrationSnapCycle measures one "create_snap + activate +
// deactivate + delete" cycle through this client and through the dmsetup
// tool. Compare the two ns/op of one run: absolute times in the VM are
// meaningless.
func BenchmarkIntegrationSnapCycle(b *testing.B) {
	c := requireDM(b)
	pool := newLoopPool(b, c)
	const origin, snap = 1, 2
	if err := c.CreateThin(pool.Name, origin); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.DeleteThin(pool.Name, origin) })
	name := devName("benchsnap")
	tg, err := ThinTable(thinSectors, pool.DevicePath, snap, "")
	if err != nil {
		b.Fatal(err)
	}

	b.Run("client", func(b *testing.B) {
		ctx := context.Background()
		steps := []struct {
			metric string
			run    func() error
			total  time.Duration
		}{
			{"create_snap-ns/op", func() error { return c.CreateSnap(pool.Name, snap, origin) }, 0},
			{"activate-ns/op", func() error { return c.Create(name, []Target{tg}, CreateOptions{}) }, 0},
			{"deactivate-ns/op", func() error { return c.Remove(ctx, name, RemoveOptions{}) }, 0},
			{"delete-ns/op", func() error { return c.DeleteThin(pool.Name, snap) }, 0},
		}
		n := 0
		for b.Loop() {
			for i := range steps {
				start := time.Now()
				if err := steps[i].run(); err != nil {
					b.Fatal(err)
				}
				steps[i].total += time.Since(start)
			}
			n++
		}
		// Report each step's time, to show where the time goes; the kernel
		// does the same work for the dmsetup tool.
		for _, s := range steps {
			b.ReportMetric(float64(s.total.Nanoseconds())/float64(n), s.metric)
		}
	})

	b.Run("dmsetup-cli", func(b *testing.B) {
		if _, err := exec.LookPath("dmsetup"); err != nil {
			if os.Getenv(requireDMEnv) == "1" {
				b.Fatal("dmsetup CLI missing")
			}
			b.Skip("dmsetup CLI missing")
		}
		env := append(os.Environ(), "DM_DISABLE_UDEV=1")
		dm := func(args ...string) {
			cmd := exec.Command("dmsetup", args...)
			cmd.Env = env
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("dmsetup %q: %v: %s", args, err, out)
			}
		}
		table := tg.String()
		sid, oid := strconv.Itoa(snap), strconv.Itoa(origin)
		for b.Loop() {
			dm("message", pool.Name, "0", "create_snap "+sid+" "+oid)
			dm("create", name, "--table", table)
			dm("remove", name)
			dm("message", pool.Name, "0", "delete "+sid)
		}
	})
	// Leave nothing behind if a sub-benchmark failed half-way.
	removeIfExists(b, c, name)
	_ = c.DeleteThin(pool.Name, snap)
}

// BenchmarkIntegrationPoolStatus measures the status read with which the
// client confirms every pool message (poolMessage), next to a message pair
// that includes it: compare the two in one run.
func BenchmarkIntegrationPoolStatus(b *testing.B) {
	c := requireDM(b)
	pool := newLoopPool(b, c)
	b.Run("status", func(b *testing.B) {
		for b.Loop() {
			if _, err := c.PoolStatusNoCommit(pool.Name); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("create_thin+delete", func(b *testing.B) {
		for b.Loop() {
			if err := c.CreateThin(pool.Name, 1); err != nil {
				b.Fatal(err)
			}
			if err := c.DeleteThin(pool.Name, 1); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkIntegrationActivateParts splits an activation into its ioctls,
// and compares it with pointing a device that exists already at another
// thin id (load, suspend, resume), to show which part costs what.
func BenchmarkIntegrationActivateParts(b *testing.B) {
	c := requireDM(b)
	pool := newLoopPool(b, c)
	const origin, snap = 1, 2
	if err := c.CreateThin(pool.Name, origin); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.DeleteThin(pool.Name, origin) })
	if err := c.CreateSnap(pool.Name, snap, origin); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.DeleteThin(pool.Name, snap) })
	table := func(id uint32) []Target {
		tg, err := ThinTable(thinSectors, pool.DevicePath, id, "")
		if err != nil {
			b.Fatal(err)
		}
		return []Target{tg}
	}
	ctx := context.Background()

	b.Run("create", func(b *testing.B) {
		name := devName("benchparts")
		defer removeIfExists(b, c, name)
		var tCreate, tLoad, tResume, tRemove time.Duration
		n := 0
		for b.Loop() {
			start := time.Now()
			req, err := newRequest(name, 0, 0)
			if err == nil {
				_, err = c.ioctl(unix.DM_DEV_CREATE, req)
			}
			if err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			if err := c.Load(name, table(snap), true); err != nil {
				b.Fatal(err)
			}
			t2 := time.Now()
			if err := c.Resume(name); err != nil {
				b.Fatal(err)
			}
			t3 := time.Now()
			if err := c.Remove(ctx, name, RemoveOptions{}); err != nil {
				b.Fatal(err)
			}
			t4 := time.Now()
			tCreate, tLoad, tResume, tRemove = tCreate+t1.Sub(start), tLoad+t2.Sub(t1), tResume+t3.Sub(t2), tRemove+t4.Sub(t3)
			n++
		}
		for metric, d := range map[string]time.Duration{"dev_create-ns/op": tCreate, "load-ns/op": tLoad, "resume-ns/op": tResume, "remove-ns/op": tRemove} {
			b.ReportMetric(float64(d.Nanoseconds())/float64(n), metric)
		}
	})

	b.Run("repoint", func(b *testing.B) {
		name := devName("benchrepoint")
		if err := c.Create(name, table(origin), CreateOptions{ReadOnly: true}); err != nil {
			b.Fatal(err)
		}
		defer removeIfExists(b, c, name)
		ids := [2]uint32{snap, origin}
		i := 0
		for b.Loop() {
			if err := c.Load(name, table(ids[i%2]), true); err != nil {
				b.Fatal(err)
			}
			if err := c.Suspend(name, SuspendOptions{}); err != nil {
				b.Fatal(err)
			}
			if err := c.Resume(name); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
