//go:build linux

// Package cadvisortest reads what the kubelet reads of the image
// filesystem, with cAdvisor's own fs package: v0.53.0, the last release
// that has it and the code the kubelet's CRI stats provider calls through
// cAdvisor's GetDirFsInfo. Only tests import it, so cAdvisor is linked
// into test binaries alone.
package cadvisortest

import (
	"fmt"
	"time"

	"github.com/google/cadvisor/fs"
)

// Kubelet is cAdvisor's view of the node's filesystems, as a kubelet
// started now would hold it: the list of mounts is read once, here.
type Kubelet struct {
	info fs.FsInfo
}

// Start lists the mounts, as cAdvisor does when the kubelet starts.
func Start() (*Kubelet, error) {
	info, err := fs.NewFsInfo(fs.Context{})
	if err != nil {
		return nil, fmt.Errorf("cadvisor: %w", err)
	}
	return &Kubelet{info: info}, nil
}

// DirFs is what the kubelet learns of the filesystem holding a directory.
type DirFs struct {
	// Device is cAdvisor's name for it (a mount's source).
	Device                    string
	Major, Minor              uint
	Capacity, Free, Available uint64
}

// DirFsInfo is cAdvisor's GetDirFsInfo(dir), which the kubelet calls for
// the mount point CRI reports: the directory's device (stat's st_dev,
// looked up among the mounts listed at Start), then that device among the
// filesystems cAdvisor measures (statfs of each mount point). cAdvisor
// takes the second from its last housekeeping (every 10-15 s in the
// kubelet); this reads it now.
func (k *Kubelet) DirFsInfo(dir string) (DirFs, error) {
	dev, err := k.info.GetDirFsDevice(dir)
	if err != nil {
		return DirFs{}, fmt.Errorf("cadvisor: device of %s: %w", dir, err)
	}
	all, err := k.info.GetGlobalFsInfo()
	if err != nil {
		return DirFs{}, fmt.Errorf("cadvisor: filesystems: %w", err)
	}
	for _, f := range all {
		if f.Device == dev.Device {
			return DirFs{Device: f.Device, Major: f.Major, Minor: f.Minor, Capacity: f.Capacity, Free: f.Free, Available: f.Available}, nil
		}
	}
	return DirFs{}, fmt.Errorf("cadvisor: no filesystem for device %s (%d:%d) of %s", dev.Device, dev.Major, dev.Minor, dir)
}

// Pool reads the pool's numbers: its data size and used bytes, and the
// bytes the kubelet should see available.
type Pool func() (total, used, available uint64, err error)

// Sample is the pool's numbers and cAdvisor's at one moment.
type Sample struct {
	At                     time.Time
	Total, Used, WantAvail uint64 // the pool's
	DirFs                         // cAdvisor's
}

func (s Sample) String() string {
	return fmt.Sprintf("cAdvisor %d bytes, %d available (%d:%d); pool %d bytes, %d used, %d to the kubelet (error %.3f%%, %.3f%% of the pool)",
		s.Capacity, s.Available, s.Major, s.Minor, s.Total, s.Used, s.WantAvail, 100*s.CapacityError(), 100*s.AvailableError())
}

// CapacityError is how far cAdvisor's capacity is from the pool's size, as
// a share of that size.
func (s Sample) CapacityError() float64 { return s.rel(s.Capacity, s.Total) }

// AvailableError is how far cAdvisor's available space is from what the
// kubelet should see, as a share of the pool's size.
func (s Sample) AvailableError() float64 { return s.rel(s.Available, s.WantAvail) }

func (s Sample) rel(a, b uint64) float64 {
	if s.Total == 0 {
		return 1
	}
	return float64(max(a, b)-min(a, b)) / float64(s.Total)
}

// Within reports whether cAdvisor is within frac of the pool's size of
// the pool's numbers.
func (s Sample) Within(frac float64) bool {
	return s.CapacityError() <= frac && s.AvailableError() <= frac
}

// Sample reads the pool, then cAdvisor for dir.
func (k *Kubelet) Sample(dir string, pool Pool) (Sample, error) {
	var s Sample
	var err error
	if s.Total, s.Used, s.WantAvail, err = pool(); err != nil {
		return s, err
	}
	if s.DirFs, err = k.DirFsInfo(dir); err != nil {
		return s, err
	}
	s.At = time.Now()
	return s, nil
}

// Watch samples the pool and cAdvisor, one sample after the other, from
// before a change until Until has seen cAdvisor follow it.
type Watch struct {
	first   Sample
	samples chan Sample
	errc    chan error
	stop    chan struct{}
	done    chan struct{}
}

// Watch takes a first sample, the state before the change the caller is
// about to make, and goes on sampling in the background.
func (k *Kubelet) Watch(dir string, pool Pool) (*Watch, error) {
	first, err := k.Sample(dir, pool)
	if err != nil {
		return nil, err
	}
	w := &Watch{first: first, samples: make(chan Sample), errc: make(chan error, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			s, err := k.Sample(dir, pool)
			if err != nil {
				w.errc <- err
				return
			}
			select {
			case w.samples <- s:
			case <-w.stop:
				return
			}
		}
	}()
	return w, nil
}

// Until waits, for at most timeout, until the pool's numbers satisfy
// changed and then until cAdvisor is within 1% of them. It returns that
// sample and the lag: the time from the first sample of the changed pool
// to it. It stops the watch.
func (w *Watch) Until(changed func(Sample) bool, timeout time.Duration) (Sample, time.Duration, error) {
	defer func() {
		close(w.stop)
		<-w.done
	}()
	if changed(w.first) {
		return w.first, 0, fmt.Errorf("the pool had changed before the watch began: %s", w.first)
	}
	var changedAt time.Time
	last := w.first
	deadline := time.After(timeout)
	for {
		select {
		case s := <-w.samples:
			last = s
			if !changed(s) {
				continue
			}
			if changedAt.IsZero() {
				changedAt = s.At
			}
			if s.Within(0.01) {
				return s, s.At.Sub(changedAt), nil
			}
		case err := <-w.errc:
			return last, 0, err
		case <-deadline:
			return last, 0, fmt.Errorf("not within 1%% of the changed pool (changed: %v) after %s: %s", !changedAt.IsZero(), timeout, last)
		}
	}
}

// Settled waits until the pool has not changed for quiet (more than the
// daemon takes to update the mirror), at most timeout, and returns the
// last sample: then cAdvisor must report the pool's numbers exactly.
func (k *Kubelet) Settled(dir string, pool Pool, quiet, timeout time.Duration) (Sample, error) {
	deadline := time.Now().Add(timeout)
	prev, err := k.Sample(dir, pool)
	for err == nil {
		time.Sleep(quiet)
		var s Sample
		if s, err = k.Sample(dir, pool); err != nil {
			break
		}
		if s.Total == prev.Total && s.Used == prev.Used {
			return s, nil
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("the pool did not settle for %s in %s: %s", quiet, timeout, s)
		}
		prev = s
	}
	return prev, err
}
