// Package storage keeps all of thin-snapshotter's state in one bbolt
// database, so every state change (snapshot records, the parent → children
// index, thin device id allocation, the pool journal, the pool transaction
// id) is one atomic transaction. It knows nothing about the kernel.
//
// # Opening
//
//	Open(ctx, path string, opts ...Opt) (*DB, error)
//	    opts: WithTimeout(time.Duration) (default DefaultOpenTimeout = 1s),
//	          WithNoSync() (tests and benchmarks only)
//	    A database held by another process (or another handle) fails after
//	    the timeout with an error matching both ErrInUse and
//	    errdefs.ErrUnavailable. A schema newer than SchemaVersion is
//	    FailedPrecondition; older ones are migrated in place.
//	(*DB).Close() error
//	(*DB).View(ctx, func(tx *Tx) error) error    // read-only transaction
//	(*DB).Update(ctx, func(tx *Tx) error) error  // write transaction, serialized
//	    fn's error rolls the whole transaction back. fn must not call View
//	    or Update (bbolt would deadlock), must not keep tx, and should be
//	    short: no kernel work inside a transaction. A Tx method refusing
//	    its arguments (NotFound, AlreadyExists, InvalidArgument,
//	    FailedPrecondition...) writes nothing, so fn may go on after it.
//	(*DB).Path() string; (*DB).Size() (int64, error)
//	(*DB).SchemaVersion(ctx) (uint32, error)
//
// # Snapshot records (Tx methods)
//
//	CreateSnapshot(Snapshot) (Snapshot, error)
//	GetSnapshot(key string) (Snapshot, error)          // any state
//	Stat(key string) (snapshots.Info, error)           // StateReady only
//	UpdateInfo(snapshots.Info, fieldpaths ...string) (snapshots.Info, error)
//	Walk(fn func(snapshots.Info) error, filters ...string) error // StateReady only
//	WalkSnapshots(fn func(Snapshot) error) error       // any state
//	CommitActive(key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (Snapshot, error)
//	RemoveSnapshot(key string) (Snapshot, error)
//	SetState(key string, State) (Snapshot, error)
//	SetShared(key string, shared uint64) (Snapshot, error)
//	Children(key string) ([]string, error)
//
// Walk filters use containerd's syntax (pkg/filters): name, kind
// (view|active|committed), parent, labels.<k> with ==, !=, ~=; fields are
// ANDed within one filter string (comma) and filter strings are ORed. As in
// containerd, an invalid regular expression matches nothing.
//
// Errors use containerd's errdefs kinds as containerd's own
// core/snapshots/storage does: NotFound, AlreadyExists, InvalidArgument
// (bad kind, parent not committed, bad field path, rebasing a parented
// active), FailedPrecondition (committing something that is not a ready
// active snapshot, removing a snapshot with children).
//
// A record's State is StateCreating, StateReady or StateRemoving. Only ready
// records exist for Stat, Walk and UpdateInfo, can be parents, or can be
// committed; the snapshotter creates records as StateCreating, does the
// pool work outside any transaction, then sets StateReady (or removes the
// record) in a second transaction.
//
// # Thin device ids (Tx methods)
//
//	AllocateID() (uint32, error)     // lowest released id, else next new one; ResourceExhausted when full
//	ReserveID(id uint32) error       // a specific id, e.g. the base device's; AlreadyExists if taken
//	ReleaseID(id uint32) error       // after the pool confirmed deletion; FailedPrecondition while a record owns it
//	IDInUse(id uint32) (bool, error)
//	IDOwner(id uint32) (owner string, inUse bool, err error)
//	WalkIDs(fn func(id uint32, owner string) error) error
//
// Ids are 1..MaxDeviceID (24 bits). A record with a non-zero DeviceID owns
// that id: CreateSnapshot requires it allocated and unowned, CommitActive
// moves ownership to the committed name, RemoveSnapshot leaves the id
// allocated but unowned until ReleaseID.
//
// # Pool journal and identity (Tx methods)
//
//	AddJournal(Entry) (seq uint64, error)
//	Journal() ([]Entry, error)          // pending entries, oldest first
//	GetJournal(seq uint64) (Entry, error)
//	FinishJournal(seq uint64) error
//	TransactionID() (uint64, error); SetTransactionID(uint64) error
//	PoolInfo() (PoolInfo, error); SetPoolInfo(PoolInfo) error
//	Meta(key string) ([]byte, error); SetMeta(key string, value []byte) error; DeleteMeta(key string) error
//
// A typical create:
//
//	Update: AllocateID, CreateSnapshot{State: StateCreating, DeviceID: id},
//	        AddJournal{Op: OpCreateSnap, DeviceID: id, OriginID: parentID, TxID: n+1}
//	(pool work, no transaction open)
//	Update: SetState(key, StateReady), SetTransactionID(n+1), FinishJournal(seq)
//	  or, on failure: RemoveSnapshot(key), ReleaseID(id), FinishJournal(seq)
//
// A typical remove:
//
//	Update: RemoveSnapshot(key), AddJournal{Op: OpDelete, DeviceID: id}
//	(pool work)
//	Update: ReleaseID(id), FinishJournal(seq)
package storage
