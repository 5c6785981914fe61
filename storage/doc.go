// Package storage keeps all of thin-snapshotter's state in one bbolt
// database, so that every change the snapshotter makes (snapshot records,
// the parent → children index, thin device id allocation, the pool journal,
// warm devices, the pool transaction id) is one atomic transaction. It knows nothing about
// the kernel; bbolt stays inside it.
//
// # Transactions
//
// Open takes the file's lock; a second opener waits for the timeout and
// then fails with ErrInUse (also errdefs.ErrUnavailable). Everything else
// happens inside DB.View or DB.Update callbacks, which receive a Tx. A
// callback's error rolls the whole transaction back, and a Tx method that
// refuses its arguments writes nothing, so a callback may try something and
// carry on. Write transactions are serialized: callbacks must be short and
// never do kernel work, which is why the snapshotter splits every pool
// operation into "decide" and "record the outcome" transactions around it.
//
// Updates that wait while another commits are committed together, in one
// transaction and one fsync, in the order they came (group commit). An
// Update that finds nothing committing runs at once, so a lone call waits
// for no one, unlike bbolt's Batch. Each Update still returns only once
// its changes are on disk. When a callback of a group fails, it gets its
// error and the others run again without it, so a callback may run more
// than once: it must change nothing outside its transaction but the
// results it assigns, and assign them on every path.
//
// # Concurrency
//
// DB.group.mu guards the queue of Updates waiting to commit; it is a leaf
// lock, held only to take the queue or hand it on. The Update that commits
// a group runs the other callers' callbacks on its own goroutine; they
// wait for their outcome.
//
// # Snapshot records
//
// A record is containerd's snapshot (kind, parent, labels, times) plus what
// the pool needs: its thin device id, size, filesystem, and lifecycle State.
// Records are created StateCreating, become StateReady once their device
// exists, and StateRemoving while removal is under way. Only ready records
// are visible to clients (Stat, Walk, UpdateInfo), can be parents or can be
// committed; recovery and checks see every record through GetSnapshot and
// WalkSnapshots. Walk takes containerd's filter syntax. Errors carry
// containerd's errdefs kinds, with the meanings containerd's own metadata
// store gives them.
//
// # Thin device ids
//
// Ids are 1..MaxDeviceID, the pool's 24 bits. AllocateID hands out the
// lowest released id or else the next never-used one; ReserveID takes a
// specific one. A record with a device id owns it; removing the record
// leaves the id allocated but unowned until ReleaseID, which the
// snapshotter calls only once the pool has deleted the device, so an id is
// never handed out while a device might still carry it. MarkForeign keeps
// an id the pool already had (someone else's device) allocated for good, and
// ReleaseID refuses it until UnmarkForeign, which only an operator's repair
// calls.
//
// # The journal
//
// Every pool mutation is written down as an Entry in the same transaction
// that changes the records, before the pool is touched, and removed by
// FinishJournal in the transaction that records its outcome. After a crash
// the pending entries are exactly the operations whose outcome is unknown;
// the snapshotter finishes or undoes each on start. The database also keeps
// the pool transaction id the snapshotter last set and PoolInfo, which ties
// the database to its pool and names the base device.
//
// A record of an active snapshot also holds an id reserved for its commit
// (Snapshot.CommitID), so the commit needs no journal entry of its own:
// the reservation is written with the record, and a device on that id can
// only be the commit's. CleanStop tells a start whether the last process
// stopped cleanly, with no commit under way.
//
// # Warm devices
//
// A warm device (Warm) is a thin device made ahead of time for the next
// child of a committed snapshot. It is not an operation in flight, so it
// has a bucket of its own: AddWarm records one on an allocated id without
// an owner, WarmDevices lists them oldest first and RemoveWarm hands one
// out or drops it.
//
// # On disk
//
// Records are a compact hand-written binary encoding. The database carries
// one schema version for its whole layout; Open migrates an older database
// in the transaction that opens it and refuses a newer one with
// errdefs.ErrFailedPrecondition. A record that does not decode is reported
// as errdefs.ErrDataLoss, never skipped.
package storage
