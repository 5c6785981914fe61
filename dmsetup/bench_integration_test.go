//go:build linux

package dmsetup

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
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
