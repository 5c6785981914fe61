package snapshotter

import (
	"sync"
	"sync/atomic"
	"time"
)

// Step names a kernel step whose latency a StepObserver sees.
type Step string

// Kernel steps observed.
const (
	StepCreateSnap Step = "create_snap"
	StepActivate   Step = "activate"
	StepDeactivate Step = "deactivate"
	StepDelete     Step = "delete"
	StepMkfs       Step = "mkfs"
	// StepGrow is a filesystem grown to a larger device (max-size).
	StepGrow Step = "grow"
)

// Steps lists every Step, for observers that declare them up front.
var Steps = []Step{StepCreateSnap, StepActivate, StepDeactivate, StepDelete, StepMkfs, StepGrow}

// StepObserver is told how long each kernel step took and whether it
// failed. It is called on the hot path: it must be quick and must not
// block.
type StepObserver interface {
	ObserveStep(step Step, d time.Duration, err error)
}

// adminState is what the snapshotter keeps for operators: the step
// observer, the last recovery and self-check (for Status) and counters
// (for metrics).
type adminState struct {
	observer atomic.Pointer[observerBox]
	// sharedLayers counts unpacks saved by layer sharing.
	sharedLayers atomic.Uint64

	mu       sync.Mutex
	recovery Recovery
	// check is the last self-check (selfcheck.go).
	check CheckRun
}

type observerBox struct{ o StepObserver }

// SetStepObserver makes o see every kernel step from now on; nil stops it.
func (s *Snapshotter) SetStepObserver(o StepObserver) {
	if o == nil {
		s.admin.observer.Store(nil)
		return
	}
	s.admin.observer.Store(&observerBox{o})
}

// timed runs fn, the kernel step step, and tells the observer.
func (s *Snapshotter) timed(step Step, fn func() error) error {
	box := s.admin.observer.Load()
	if box == nil {
		return fn()
	}
	start := time.Now()
	err := fn()
	box.o.ObserveStep(step, time.Since(start), err)
	return err
}

// recovered adds to the counts of the last recovery.
func (s *Snapshotter) recovered(fn func(r *Recovery)) {
	s.admin.mu.Lock()
	defer s.admin.mu.Unlock()
	fn(&s.admin.recovery)
}
