// Package dmsetup is a pure-Go device-mapper client speaking the ioctl
// protocol of /dev/mapper/control directly (no cgo, no dmsetup binary), plus
// helpers for thin provisioning and a loopback-backed thin pool.
//
// The package knows nothing about snapshots; it manages dm devices, tables
// and thin-pool messages.
//
// # Client
//
//	func Open(opts ...Option) (*Client, error)      // opens (or mknods) /dev/mapper/control
//	func WithUdev(mode UdevMode) Option              // UdevAuto (default), UdevOn, UdevOff
//	func WithDevDir(dir string) Option               // where device nodes live, default /dev/mapper
//	func (c *Client) Close() error
//	func (c *Client) UdevRunning() bool
//	func (c *Client) DevicePath(name string) string  // <devdir>/<name>
//
//	func (c *Client) Version() (Version, error)
//	func (c *Client) List() ([]Device, error)
//	func (c *Client) Info(name string) (Info, error)
//	func (c *Client) Create(name string, targets []Target, opts CreateOptions) error
//	func (c *Client) Load(name string, targets []Target, readOnly bool) error
//	func (c *Client) ClearTable(name string) error
//	func (c *Client) Suspend(name string, opts SuspendOptions) error
//	func (c *Client) Resume(name string) error
//	func (c *Client) Remove(ctx context.Context, name string, opts RemoveOptions) error
//	func (c *Client) Message(name string, sector uint64, msg string) (string, error)
//	func (c *Client) Status(name string) ([]TargetStatus, error)
//	func (c *Client) Table(name string) ([]Target, error)
//	func (c *Client) TargetVersions() ([]TargetVersion, error)
//	func (c *Client) TargetVersion(target string) (Version, error)
//
// Create is DEV_CREATE + TABLE_LOAD + resume; a half-made device is removed
// when the load or the resume fails. Remove retries EBUSY a bounded number of
// times (default 10 x 50ms) and honours ctx; RemoveOptions.Deferred asks the
// kernel to remove the device on last close.
//
// # Errors
//
// Every failing kernel call returns *Error{Op, Device, Err} whose Unwrap
// yields the syscall.Errno, so errors.Is(err, unix.EEXIST) (ENODATA, EBUSY,
// ENXIO, EINVAL, ...) works. *Error also matches the containerd errdefs kinds:
// ENXIO and ENODATA are errdefs.ErrNotFound, EEXIST (and the EBUSY the
// kernel returns when Create meets a taken name or uuid) is
// errdefs.ErrAlreadyExists, EINVAL is errdefs.ErrInvalidArgument.
// IsNotFound, IsExist and IsBusy are shorthands. Parse failures of kernel
// replies, status and table lines match ErrMalformed.
//
// # Device nodes
//
// Without udev (UdevOff, or UdevAuto and no /run/udev/control) Create and
// Resume mknod <devdir>/<name> with the major:minor the kernel reported,
// replacing a stale node, and Remove deletes it. With udev running, the client
// only creates the node when it is missing after a resume and never waits for
// udev.
//
// # Thin provisioning (thin.go)
//
//	func PoolTable(lengthSectors uint64, p PoolParams) (Target, error)
//	func ThinTable(lengthSectors uint64, poolDev string, id uint32, externalOrigin string) (Target, error)
//	func ParsePoolParams(params string) (PoolParams, error)   // table line of a thin-pool target
//	func ParseThinParams(params string) (ThinParams, error)   // table line of a thin target
//	func ParsePoolStatus(s string) (PoolStatus, error)
//	func ParseThinStatus(s string) (ThinStatus, error)
//	func (c *Client) PoolStatus(pool string) (PoolStatus, error)
//	func (c *Client) ThinStatus(name string) (ThinStatus, error)
//	func (c *Client) CreateThin(pool string, id uint32) error
//	func (c *Client) CreateSnap(pool string, id, origin uint32) error
//	func (c *Client) DeleteThin(pool string, id uint32) error
//	func (c *Client) SetTransactionID(pool string, old, new uint64) error
//	func (c *Client) ReserveMetadataSnap(pool string) error
//	func (c *Client) ReleaseMetadataSnap(pool string) error
//
// Snapshotting an active origin requires suspending it around CreateSnap
// (Suspend, CreateSnap, Resume) so that its in-flight writes are flushed.
// Pool messages are not idempotent, so Message never retries; a reply too
// large for its buffer is reported as ENOBUFS.
//
// # Tests
//
// Unit tests run anywhere. TestIntegration* and BenchmarkIntegration* need
// root and dm-thin: they skip without them, or fail when
// THIN_TEST_REQUIRE_DM=1 (set by test/vm). THIN_TEST_DISK names a scratch
// block device for the pool-on-disk test.
//
// # Loopback pool (loop.go)
//
//	func CreateLoopPool(ctx context.Context, c *Client, cfg LoopPoolConfig) (*LoopPool, error)
//	func (p *LoopPool) Close(ctx context.Context) error    // removes the pool device; loops autoclear
//	func (p *LoopPool) Destroy(ctx context.Context) error  // Close and delete the backing files
//
// CreateLoopPool creates sparse data and metadata files when missing (zeroing
// the metadata header so the kernel formats it), attaches them to
// autoclearing loop devices and creates the thin-pool device, or reuses an
// existing pool device backed by the same files.
package dmsetup
