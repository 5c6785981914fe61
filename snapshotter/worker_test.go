package snapshotter

import (
	"context"
	"testing"
	"time"
)

// TestActivityPause: background work waits while a call is in flight and
// goes once calls pause, when its deadline has passed, or when its context
// ends.
func TestActivityPause(t *testing.T) {
	far := func() time.Time { return time.Now().Add(time.Hour) }
	tests := []struct {
		name     string
		inFlight bool // a call runs until the test ends it
		deadline func() time.Time
		cancel   bool
		waits    bool // pause must not return while the call runs
	}{
		{name: "no call yet", deadline: far},
		{name: "call in flight", inFlight: true, deadline: far, waits: true},
		{name: "deadline passed", inFlight: true, deadline: func() time.Time { return time.Now().Add(-time.Second) }},
		{name: "context ended", inFlight: true, deadline: far, cancel: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var a activity
			end := func() {}
			if tc.inFlight {
				end = a.begin()
			}
			defer end()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancel {
				cancel()
			}
			done := make(chan struct{})
			go func() {
				a.pause(ctx, tc.deadline())
				close(done)
			}()
			if tc.waits {
				select {
				case <-done:
					t.Fatal("pause returned while a call was in flight")
				case <-time.After(4 * quietFor):
				}
				end()
			}
			select {
			case <-done:
			case <-time.After(time.Minute):
				t.Fatal("pause did not return")
			}
		})
	}
}

// TestActivityPauseAfterCall: a call that just ended holds background work
// back until calls have paused for quietFor.
func TestActivityPauseAfterCall(t *testing.T) {
	var a activity
	a.begin()()
	ended := time.Now()
	a.pause(context.Background(), time.Now().Add(time.Hour))
	if waited := time.Since(ended); waited < quietFor {
		t.Errorf("pause returned %s after the last call, want at least %s", waited, quietFor)
	}
}
