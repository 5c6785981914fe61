package snapshotter

// FindingKind names a kind of inconsistency.
type FindingKind string

const (
	// FindingOrphan means a thin id in the pool that no record, journal entry
	// or the base explains. Repair records it foreign.
	FindingOrphan FindingKind = "orphan"
	// FindingGhost means a ready record whose thin device is not in the pool.
	FindingGhost FindingKind = "ghost"
	// FindingBaseMissing means the base device is not in the pool.
	FindingBaseMissing FindingKind = "base_missing"
	// FindingWrongDevice means the dm device named for a record's id maps
	// something else (another id, another pool, another size or mode).
	FindingWrongDevice FindingKind = "wrong_device"
	// FindingStaleDevice means a dm device named like ours that no active
	// snapshot or view needs (no record, a committed one, the base).
	FindingStaleDevice FindingKind = "stale_device"
	// FindingMissingDevice means an active snapshot or view without dm device.
	FindingMissingDevice FindingKind = "missing_device"
	// FindingPendingJournal means an operation a crash interrupted.
	FindingPendingJournal FindingKind = "pending_journal"
	// FindingNotReady means a record left creating or removing without a
	// journal entry.
	FindingNotReady FindingKind = "not_ready"
	// FindingLeakedID means an id allocated in the database with no record,
	// journal entry or base, and not in the pool.
	FindingLeakedID FindingKind = "leaked_id"
	// FindingForeign means a thin id recorded as foreign: the pool had a
	// device there that the database cannot prove it made (listed when the
	// daemon took the pool, found by a create, left by an interrupted
	// create, or an orphan a repair kept), so it is kept and never used.
	// Only --release-foreign repairs it.
	FindingForeign FindingKind = "foreign_id"
	// FindingIDConflict means a record's id is not allocated to it, or two
	// records share an id.
	FindingIDConflict FindingKind = "id_conflict"
	// FindingTxIDMismatch means the database's transaction id is not the
	// pool's.
	FindingTxIDMismatch FindingKind = "txid_mismatch"
	// FindingPoolUnhealthy means the pool is failed, read-only or needs
	// thin_check.
	FindingPoolUnhealthy FindingKind = "pool_unhealthy"
)

// FindingKinds lists every FindingKind, for those that declare them up
// front (the metrics).
var FindingKinds = []FindingKind{
	FindingOrphan, FindingGhost, FindingBaseMissing, FindingWrongDevice, FindingStaleDevice,
	FindingMissingDevice, FindingPendingJournal, FindingNotReady, FindingLeakedID, FindingForeign,
	FindingIDConflict, FindingTxIDMismatch, FindingPoolUnhealthy,
}

// Finding is one inconsistency, and what Repair did about it.
type Finding struct {
	Kind       FindingKind `json:"kind"`
	DeviceID   uint32      `json:"device_id"`
	Device     string      `json:"device"`
	Key        string      `json:"key"`
	Message    string      `json:"message"`
	Repairable bool        `json:"repairable"`
	Action     string      `json:"action"`
	Repaired   bool        `json:"repaired"`
	Error      string      `json:"error"`

	seq    uint64 // journal sequence of a pending entry
	inPool bool   // a foreign id's device is in the pool
}

// Report is the outcome of Check. `thin-snapshotter check --json` prints
// it; the shape is stable: fields are only ever added.
//
//	{
//	  "root": "/var/lib/thin-snapshotter",
//	  "pool": "thin-0123456789ab-pool",
//	  "repair": false,                  // whether --repair ran
//	  "pool_transaction_id": 12,
//	  "db_transaction_id": 12,
//	  "base_device_id": 1,
//	  "pool_devices": [1, 2, 5],        // thin ids in the pool metadata, ascending
//	  "records": 2,                     // snapshot records in the database
//	  "findings": [                     // found before any repair; [] when none
//	    {
//	      "kind": "orphan",             // a FindingKind
//	      "device_id": 5,               // thin id; 0 when none
//	      "device": "thin-0123456789ab-pool-snap-5", // dm name; "" when none
//	      "key": "",                    // snapshot key; "" when none
//	      "message": "thin device 5 is in the pool but in no record, journal entry or the base",
//	      "repairable": true,           // --repair would try to fix it
//	      "action": "deleted thin device 5 from the pool", // what --repair did; "" otherwise
//	      "repaired": true,             // --repair fixed it
//	      "error": ""                   // why the repair failed; "" otherwise
//	    }
//	  ],
//	  "remaining": [],                  // problems left, same element shape: the findings
//	                                    // without --repair, a fresh check after it
//	  "clean": true,                    // remaining is empty
//	  "online": false                   // taken from the serving daemon (check --online)
//	}
type Report struct {
	Root              string    `json:"root"`
	Pool              string    `json:"pool"`
	Repair            bool      `json:"repair"`
	PoolTransactionID uint64    `json:"pool_transaction_id"`
	DBTransactionID   uint64    `json:"db_transaction_id"`
	BaseDeviceID      uint32    `json:"base_device_id"`
	PoolDevices       []uint32  `json:"pool_devices"`
	Records           int       `json:"records"`
	Findings          []Finding `json:"findings"`
	Remaining         []Finding `json:"remaining"`
	Clean             bool      `json:"clean"`
	// Online says the daemon was serving: read-only, and findings that
	// operations in flight explain are left out (CheckOnline).
	Online bool `json:"online"`
}

// CheckOptions select what Check may change.
type CheckOptions struct {
	// Repair fixes what is safe to fix.
	Repair bool
	// RemoveGhosts (with Repair) removes the records of snapshots whose
	// thin device is gone.
	RemoveGhosts bool
	// ReleaseForeign (with Repair) frees foreign ids, deleting their
	// devices from the pool when still there.
	ReleaseForeign bool
}
