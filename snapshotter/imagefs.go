package snapshotter

import (
	"context"
	"os"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/thin-snapshotter/thin-snapshotter/internal/imagefs"
)

// imageFSPoll is how often the image filesystem mirror follows the pool.
// The pool's status is that of its last metadata commit (the kernel
// commits every second), so statfs of the mirror lags the pool by at most
// about both.
const imageFSPoll = 2 * time.Second

// imageFSMirror is what the snapshotter needs of the mirror;
// *imagefs.Mirror is one, unit tests use a fake.
type imageFSMirror interface {
	Set(ctx context.Context, size, available uint64) error
}

// imageFS is the image filesystem mirror (Config.ImageFSMirror) and how it
// fares.
type imageFS struct {
	// m is nil when the mirror is off or could not be set up. m and
	// device are set before the background work starts and only read
	// afterwards.
	m      imageFSMirror
	device string
	// open opens the mirror (imagefs.Open), and poll is how often the
	// watcher updates it (imageFSPoll); unit tests replace both.
	open func(ctx context.Context, root string, size uint64) (imageFSMirror, string, error)
	poll time.Duration

	mu sync.Mutex
	// err is why the mirror is missing, or why its last update failed;
	// nil when all is well. Guarded by mu.
	err error
}

// openMirror opens the mirror with imagefs.Open and logs what it found.
func openMirror(ctx context.Context, root string, size uint64) (imageFSMirror, string, error) {
	m, err := imagefs.Open(ctx, root, size)
	if err != nil {
		return nil, "", err
	}
	log.G(ctx).WithField("dir", imagefs.Dir(root)).WithField("device", m.Device).WithField("how", m.How).
		Info("image filesystem mirror mounted")
	return m, m.Device, nil
}

// setUpImageFS mounts the mirror and gives it the pool's numbers before
// the daemon serves, so before the kubelet (which starts after containerd)
// first reads them. With the mirror off it takes down one left from
// before. A failure is logged and shown by Status but fails nothing: the
// kubelet then sees the filesystem holding the directory, as it would
// without a mirror.
func (s *Snapshotter) setUpImageFS(ctx context.Context) {
	root := s.cfg.Root
	// The directory containerd's exports root names must exist, mirror
	// or not.
	err := os.MkdirAll(imagefs.Dir(root), 0o700)
	switch {
	case err != nil:
	case !s.cfg.ImageFSMirror:
		err = imagefs.Remove(root)
	default:
		var st Status
		if err = s.poolStatus(&st); err == nil {
			var m imageFSMirror
			if m, s.imagefs.device, err = s.imagefs.open(ctx, root, st.DataTotal); err == nil {
				s.imagefs.m = m
				err = s.syncImageFS(ctx)
			}
		}
	}
	s.imagefs.record(ctx, err)
}

// watchImageFS keeps the mirror on the pool's numbers every imageFSPoll
// until ctx ends. It runs in its own goroutine (startBackground).
func (s *Snapshotter) watchImageFS(ctx context.Context) {
	t := time.NewTicker(s.imagefs.poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.imagefs.record(ctx, s.syncImageFS(ctx))
		}
	}
}

// syncImageFS gives the mirror the pool's data size and what the kubelet
// may count on of its free space.
func (s *Snapshotter) syncImageFS(ctx context.Context) error {
	var st Status
	if err := s.poolStatus(&st); err != nil {
		return err
	}
	return s.imagefs.m.Set(ctx, st.DataTotal, imageFSAvailable(st.DataTotal, st.DataUsed, st.DataBlockSize, s.cfg.MinFreeData))
}

// imageFSAvailable is the pool's free data space less what minFree keeps
// for running containers (keptFree), in bytes: it reaches 0 no later than
// Prepare starts refusing new devices, so the kubelet's image garbage
// collection and eviction act first.
func imageFSAvailable(total, used, blockSize uint64, minFree float64) uint64 {
	if blockSize == 0 {
		return 0
	}
	blocks := total / blockSize
	free := blocks - min(used/blockSize, blocks)
	return (free - min(free, keptFree(blocks, minFree))) * blockSize
}

// record keeps err for Status and logs when the mirror's fate changes.
func (f *imageFS) record(ctx context.Context, err error) {
	f.mu.Lock()
	was := f.err
	f.err = err
	f.mu.Unlock()
	switch {
	case err != nil && (was == nil || was.Error() != err.Error()):
		log.G(ctx).WithError(err).Warn("image filesystem mirror: the kubelet may not see the pool's size and free space")
	case err == nil && was != nil:
		log.G(ctx).Info("image filesystem mirror follows the pool again")
	}
}

// ImageFSStatus is what the kubelet sees of the image filesystem: what
// cAdvisor reads with stat and statfs of Dir.
type ImageFSStatus struct {
	// Dir is the directory CRI reports (containerd's exports root).
	Dir string
	// Mirrored: the mirror is mounted at Dir and follows the pool.
	Mirrored bool
	// Device is the mirror's loop device; empty when not mirrored.
	Device string
	imagefs.Stat
	// Error is why there is no mirror, or why its last update failed.
	Error string
}

// imageFSStatus reads what the kubelet sees now.
func (s *Snapshotter) imageFSStatus() ImageFSStatus {
	out := ImageFSStatus{Dir: imagefs.Dir(s.cfg.Root), Mirrored: s.imagefs.m != nil, Device: s.imagefs.device}
	s.imagefs.mu.Lock()
	if s.imagefs.err != nil {
		out.Error = s.imagefs.err.Error()
	}
	s.imagefs.mu.Unlock()
	st, err := imagefs.StatDir(out.Dir)
	if err != nil && out.Error == "" {
		out.Error = err.Error()
	}
	out.Stat = st
	return out
}
