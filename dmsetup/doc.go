// Package dmsetup is a pure-Go device-mapper client speaking the ioctl
// protocol of /dev/mapper/control directly (no cgo, no dmsetup binary), plus
// helpers for thin provisioning and a loopback-backed thin pool. It is
// Linux-only.
//
// The package knows nothing about snapshots; it manages dm devices, tables,
// thin-pool messages and the names of thin devices in a pool (DeviceName).
//
// # Client
//
// Open opens /dev/mapper/control (making the node when it is missing).
// Client methods map one to one onto the dm ioctls, except that Create is
// DEV_CREATE + TABLE_LOAD + resume and removes a half-made device when the
// load or the resume fails. Remove retries EBUSY (by default 10 times, 50ms
// apart) and honours its context; RemoveOptions.Deferred asks the kernel to
// remove the device on last close instead. WaitEvent waits for a device's
// next dm event, such as a thin pool crossing its low water mark.
//
// # Units
//
// Every length and offset the kernel takes or reports is in sectors of
// SectorSize bytes; Sectors and BytesToSectors are the one place bytes and
// sectors meet.
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
// replies, status and table lines and of the output of thin-provisioning-tools
// match ErrMalformed.
//
// # Device nodes
//
// Without udev (no /run/udev/control) Create and Resume mknod <devdir>/<name> with the major:minor the kernel reported,
// replacing a stale node, and Remove deletes it. With udev running, the client
// only creates the node when it is missing after a resume and never waits for
// udev.
//
// # Thin provisioning
//
// ThinTable builds the table line of a thin device, and ParsePoolParams
// reads a thin-pool table line as the kernel reports it. ThinTarget and
// PoolTarget read and parse the table of a device, ThinStatus and PoolStatus
// its status. The Client sends the thin-pool messages (create_thin,
// create_snap, delete, set_transaction_id, reserve/release_metadata_snap).
//
// Snapshotting an active origin requires suspending it around CreateSnap
// (Suspend, CreateSnap, Resume) so that its in-flight writes are flushed.
// Pool messages are not idempotent, so they are never retried; a reply too
// large for its buffer is reported as ENOBUFS. The kernel answers a message
// whose metadata commit failed with success and rolls it back, so the
// client reads the pool's status after each message and reports EIO when
// the pool went read-only or failed (PoolStatus.ReadOnly).
//
// MetadataThinIDs lists the thin ids in a running pool's metadata: it
// reserves a metadata snapshot, runs thin_ls (or thin_dump) on the metadata
// device, and always releases the snapshot. ReserveMetadataSnapshot does
// the same in steps, for a caller that must hold other work back only while
// the snapshot is taken, not while it is read.
//
// # Loopback pool
//
// CreateLoopPool creates sparse data and metadata files when missing (zeroing
// the metadata header so the kernel formats it), attaches them to
// autoclearing loop devices and creates the thin-pool device, or reuses an
// existing pool device backed by the same files. Grow makes a running loop
// pool bigger. Destroy removes the pool device (the loops clear themselves)
// and deletes the files.
//
// # Tests
//
// Unit tests run anywhere. TestIntegration* and BenchmarkIntegration* need
// root and dm-thin: they skip without them, or fail when
// THIN_TEST_REQUIRE_DM=1 (set by test/vm). THIN_TEST_DISK names a scratch
// block device for the pool-on-disk test.
package dmsetup
