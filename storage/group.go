package storage

import (
	"errors"
	"fmt"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// group commits together the write transactions that would otherwise wait
// for one another: bbolt has one writer, and each commit costs an fsync
// (about 20 ms in the VM bench). An Update that finds no commit under way runs at once and
// alone; those that arrive meanwhile queue, and the first of them then
// runs all of the queue in one transaction: one fsync for all. No call
// waits for others to arrive, unlike bbolt's Batch, so a lone Update costs
// what bbolt's Update does.
//
// The callbacks of a group run one after another in one transaction, in
// the order they queued, each seeing the writes of those before it, as
// they would in transactions of their own. When one fails, the rest run
// again without it: the failed one gets its error and changes nothing.
type group struct {
	mu      sync.Mutex
	queue   []*groupCall
	running bool // a group is being committed
	off     bool // benchmarks compare with one commit per Update
}

type groupCall struct {
	fn func(*Tx) error
	// done gets the outcome, or nil to tell this call to commit the
	// queue next.
	done chan *groupResult
}

type groupResult struct {
	err      error
	panicked any
}

func (g *group) update(d *DB, fn func(*Tx) error) error {
	if g.off {
		return d.db.Update(func(btx *bolt.Tx) error { return fn(d.newTx(btx)) })
	}
	c := &groupCall{fn: fn, done: make(chan *groupResult, 1)}
	g.mu.Lock()
	g.queue = append(g.queue, c)
	lead := !g.running
	g.running = true
	g.mu.Unlock()
	for {
		if lead {
			g.commitQueue(d)
		}
		r := <-c.done
		if r == nil {
			lead = true
			continue
		}
		if r.panicked != nil {
			panic(r.panicked)
		}
		return r.err
	}
}

// commitQueue commits the queue as one group, then hands the next group
// to the first call queued meanwhile.
func (g *group) commitQueue(d *DB) {
	g.mu.Lock()
	calls := g.queue
	g.queue = nil
	g.mu.Unlock()
	g.commit(d, calls)
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.queue) == 0 {
		g.running = false
		return
	}
	g.queue[0].done <- nil
}

// commit runs calls in one transaction and tells each its outcome. A call
// whose callback fails gets its error; the others run again without it.
func (g *group) commit(d *DB, calls []*groupCall) {
	for len(calls) > 0 {
		failed := -1
		var failure *groupResult
		err := d.db.Update(func(btx *bolt.Tx) error {
			for i, c := range calls {
				if r := run(c.fn, d.newTx(btx)); r != nil {
					failed, failure = i, r
					return errCallFailed
				}
			}
			return nil
		})
		if failed < 0 {
			// Committed, or the commit itself failed for all.
			for _, c := range calls {
				c.done <- &groupResult{err: err}
			}
			return
		}
		calls[failed].done <- failure
		calls = append(calls[:failed:failed], calls[failed+1:]...)
	}
}

var errCallFailed = errors.New("a callback of the group failed")

// run calls fn, turning a panic into a result for its caller to raise.
func run(fn func(*Tx) error, tx *Tx) (r *groupResult) {
	defer func() {
		if p := recover(); p != nil {
			r = &groupResult{err: fmt.Errorf("update panicked: %v", p), panicked: p}
		}
	}()
	if err := fn(tx); err != nil {
		return &groupResult{err: err}
	}
	return nil
}
