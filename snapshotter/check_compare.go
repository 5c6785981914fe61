package snapshotter

import (
	"fmt"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// compare turns the state into findings, in a stable order.
func (s *Snapshotter) compare(st *checkState) []Finding {
	c := &comparison{s: s, st: st, out: []Finding{},
		inFlight: map[uint32]bool{}, journalKeys: map[string]bool{},
		owned: map[uint32]string{}, want: map[string]storage.Snapshot{}, settled: map[string]bool{}, layers: map[uint32]bool{}}
	if in, err := s.inspector(); err == nil {
		c.poolDev = in.PoolDevice()
	}
	c.pool()
	c.journal()
	c.base()
	c.records()
	c.foreign()
	c.poolIDs()
	c.idTable()
	c.devices()
	c.missingDevices()
	return c.out
}

// comparison is one compare in progress: the state, the findings so far
// and what the phases learn for the later ones.
type comparison struct {
	s       *Snapshotter
	st      *checkState
	out     []Finding
	poolDev string // the pool as thin tables name it; "" when unknown

	// inFlight: ids the journal or the warm devices explain, which are
	// no orphans, leaks or ghosts; journalKeys: keys of pending entries.
	inFlight    map[uint32]bool
	journalKeys map[string]bool
	// owned: id → key of its record; want: dm devices that must exist,
	// by name; settled: devices another finding's repair removes.
	owned   map[uint32]string
	want    map[string]storage.Snapshot
	settled map[string]bool
	// layers are the devices of committed snapshots.
	layers map[uint32]bool
}

func (c *comparison) add(f Finding) { c.out = append(c.out, f) }

// pool reports an unhealthy pool and transaction ids that disagree.
func (c *comparison) pool() {
	st := c.st
	if err := poolHealth(c.s.pool.Name(), st.status, -1, -1); err != nil && !errdefs.IsResourceExhausted(err) {
		c.add(Finding{Kind: FindingPoolUnhealthy, Message: err.Error()})
	}
	if ok, why := c.s.poolIsOurs(st); !ok || st.poolTx != st.dbTx {
		f := Finding{Kind: FindingTxIDMismatch, Repairable: ok,
			Message: fmt.Sprintf("pool transaction id %d, database %d", st.poolTx, st.dbTx)}
		if why != "" {
			f.Message += ": " + why
		} else {
			f.Message += fmt.Sprintf(" (explained by %d pending journal entries)", len(st.journal))
		}
		c.add(f)
	}
}

// journal reports every pending entry and notes what entries and warm
// devices account for.
func (c *comparison) journal() {
	for _, w := range c.st.warm {
		// A device made ahead, accounted for; the daemon's next start
		// deletes what a crash left.
		c.inFlight[w.DeviceID] = true
	}
	for _, e := range c.st.journal {
		c.inFlight[e.DeviceID] = true
		if e.Key != "" {
			c.journalKeys[e.Key] = true
		}
		f := Finding{Kind: FindingPendingJournal, DeviceID: e.DeviceID, Key: e.Key, Repairable: true, seq: e.Seq,
			Message: fmt.Sprintf("interrupted %s of thin device %d (journal entry %d, %s)", e.Op, e.DeviceID, e.Seq, e.Created.UTC().Format(time.RFC3339))}
		if e.Name != "" {
			f.Message += fmt.Sprintf(" as %q", e.Name)
		}
		c.add(f)
	}
}

// base reports a base device missing from the pool.
func (c *comparison) base() {
	if base := c.st.pi.BaseDeviceID; base != 0 && !c.st.inPool[base] && !c.inFlight[base] {
		c.add(Finding{Kind: FindingBaseMissing, DeviceID: base, Repairable: true,
			Message: fmt.Sprintf("base device %d is not in the pool", base)})
	}
}

// records reports records whose ids conflict, records left creating or
// removing, and ghosts; it notes which dm devices must exist.
func (c *comparison) records() {
	st := c.st
	byKey := map[string]storage.Snapshot{}
	for _, sn := range st.records {
		byKey[sn.Key] = sn
	}
	for _, sn := range st.records {
		if sharesDevice(sn) {
			c.sharedView(sn, byKey[sn.Parent])
			continue
		}
		name := c.s.deviceName(sn.DeviceID)
		if prev, dup := c.owned[sn.DeviceID]; dup {
			c.add(Finding{Kind: FindingIDConflict, DeviceID: sn.DeviceID, Key: sn.Key,
				Message: fmt.Sprintf("records %q and %q share thin device %d", prev, sn.Key, sn.DeviceID)})
			continue
		}
		c.owned[sn.DeviceID] = sn.Key
		c.ownedBy(sn, sn.DeviceID)
		if sn.Kind == snapshots.KindCommitted {
			c.layers[sn.DeviceID] = true
		}
		if sn.CommitID != 0 {
			// Reserved for its commit: a device there is from a commit a
			// crash cut short, and the next commit or the removal deletes
			// it.
			c.owned[sn.CommitID] = sn.Key
			c.inFlight[sn.CommitID] = true
			c.ownedBy(sn, sn.CommitID)
		}
		if c.journalKeys[sn.Key] || c.inFlight[sn.DeviceID] {
			continue
		}
		if sn.State != storage.StateReady {
			c.settled[name] = true // its removal takes the device too
			c.add(Finding{Kind: FindingNotReady, DeviceID: sn.DeviceID, Key: sn.Key, Device: name, Repairable: true,
				Message: fmt.Sprintf("record %q is %s with no operation pending", sn.Key, sn.State)})
			continue
		}
		if !st.inPool[sn.DeviceID] {
			c.add(Finding{Kind: FindingGhost, DeviceID: sn.DeviceID, Key: sn.Key, Device: name,
				Message: fmt.Sprintf("%s snapshot %q: thin device %d is not in the pool (its data is lost)", sn.Kind, sn.Key, sn.DeviceID)})
			continue
		}
		if sn.Kind != snapshots.KindCommitted {
			c.want[name] = sn
		}
	}
}

// sharedView notes that the device of layer p must be active, read-only,
// for ready view sn, which shares it.
func (c *comparison) sharedView(sn, p storage.Snapshot) {
	if sn.State != storage.StateReady || p.DeviceID == 0 || c.inFlight[p.DeviceID] {
		return
	}
	name := c.s.deviceName(p.DeviceID)
	if !c.st.inPool[p.DeviceID] {
		c.settled[name] = true // the layer is a ghost: reported as such
		return
	}
	if _, ok := c.want[name]; !ok {
		c.want[name] = storage.Snapshot{Key: sn.Key, Kind: snapshots.KindView, DeviceID: p.DeviceID, Size: p.Size}
	}
}

// ownedBy reports id, which record sn holds, unless the id table gives it
// to sn.
func (c *comparison) ownedBy(sn storage.Snapshot, id uint32) {
	owner, ok := c.st.ids[id]
	if ok && owner == sn.Key {
		return
	}
	msg := fmt.Sprintf("thin device %d of %q is not allocated in the id table (it could be handed out twice)", id, sn.Key)
	if ok {
		msg = fmt.Sprintf("thin device %d of %q is allocated to %q in the id table", id, sn.Key, owner)
	}
	c.add(Finding{Kind: FindingIDConflict, DeviceID: id, Key: sn.Key, Message: msg})
}

// foreign reports the foreign ids.
func (c *comparison) foreign() {
	for _, id := range sortedKeys(c.st.foreign) {
		f := Finding{Kind: FindingForeign, DeviceID: id, inPool: c.st.inPool[id]}
		if f.inPool {
			f.Message = fmt.Sprintf("thin id %d was already in the pool when a create tried it: a device that is not ours, kept and never used; "+
				"--repair --release-foreign deletes it from the pool and frees the id", id)
		} else {
			f.Message = fmt.Sprintf("thin id %d is marked foreign but is no longer in the pool; --repair --release-foreign frees the id", id)
		}
		c.add(f)
	}
}

// explained says whether id is accounted for by a record, the base, an
// entry, a warm device or the foreign mark.
func (c *comparison) explained(id uint32) bool {
	_, owned := c.owned[id]
	return owned || id == c.st.pi.BaseDeviceID || c.inFlight[id] || c.st.foreign[id]
}

// poolIDs reports the thin ids in the pool that nothing explains.
func (c *comparison) poolIDs() {
	for _, id := range c.st.poolIDs() {
		if c.explained(id) {
			continue
		}
		if owner := c.st.ids[id]; owner != "" {
			// Deleting it would leave an id no release can free.
			c.add(Finding{Kind: FindingIDConflict, DeviceID: id, Key: owner,
				Message: fmt.Sprintf("thin device %d is in the pool and allocated to %q, which has no record", id, owner)})
			continue
		}
		c.add(Finding{Kind: FindingOrphan, DeviceID: id, Device: c.s.deviceName(id), Repairable: true,
			Message: fmt.Sprintf("thin device %d is in the pool but in no record, journal entry or the base; "+
				"--repair keeps it as foreign, --repair --release-foreign deletes it", id)})
	}
}

// idTable reports allocated ids that nothing explains and the pool does
// not have.
func (c *comparison) idTable() {
	for _, id := range sortedKeys(c.st.ids) {
		if c.explained(id) || c.st.inPool[id] {
			continue
		}
		if owner := c.st.ids[id]; owner != "" {
			c.add(Finding{Kind: FindingIDConflict, DeviceID: id, Key: owner,
				Message: fmt.Sprintf("id %d is allocated to %q, which has no record", id, owner)})
			continue
		}
		c.add(Finding{Kind: FindingLeakedID, DeviceID: id, Repairable: true,
			Message: fmt.Sprintf("id %d is allocated but in no record, journal entry or the pool", id)})
	}
}

// devices reports dm devices no snapshot needs and needed ones with the
// wrong table or mode.
func (c *comparison) devices() {
	for _, name := range sortedKeys(c.st.devices) {
		d := c.st.devices[name]
		id, numbered := c.s.idOfName(name)
		if (numbered && c.inFlight[id]) || c.settled[name] {
			continue
		}
		sn, needed := c.want[name]
		if !needed && !c.s.forCheck && numbered && c.layers[id] && d.info.ReadOnly && d.info.OpenCount == 0 {
			// A serving daemon keeps a layer's device a while after
			// its last view, for the next one (view.go).
			continue
		}
		if !needed {
			c.add(c.staleDevice(name, id, numbered, d.info))
			continue
		}
		if !d.info.LiveTable {
			// An activation cut short between creating the device
			// and loading its table; activating completes it.
			c.add(Finding{Kind: FindingMissingDevice, DeviceID: sn.DeviceID, Device: name, Key: sn.Key, Repairable: true,
				Message: fmt.Sprintf("%s snapshot %q has dm device %s without a table", sn.Kind, sn.Key, name)})
			continue
		}
		if wrong := c.wrongTable(d, sn); len(wrong) > 0 {
			c.add(Finding{Kind: FindingWrongDevice, DeviceID: sn.DeviceID, Device: name, Key: sn.Key, Repairable: d.info.OpenCount == 0,
				Message: fmt.Sprintf("dm device %s of %q %s%s", name, sn.Key, strings.Join(wrong, ", "), openNote(d.info))})
		}
	}
}

// staleDevice is the finding of dm device name, which no snapshot needs.
func (c *comparison) staleDevice(name string, id uint32, numbered bool, info dmsetup.Info) Finding {
	why := "no record has thin device " + strings.TrimPrefix(name, dmsetup.DeviceNamePrefix(c.s.devicePool()))
	if k, ok := c.owned[id]; ok && numbered {
		why = fmt.Sprintf("%q is not an active snapshot or view", k)
	} else if numbered && id == c.st.pi.BaseDeviceID {
		why = "the base device is only active while it is made"
	}
	return Finding{Kind: FindingStaleDevice, DeviceID: id, Device: name, Repairable: info.OpenCount == 0,
		Message: fmt.Sprintf("dm device %s is active but %s%s", name, why, openNote(info))}
}

// wrongTable lists how dm device d differs from what record sn needs.
func (c *comparison) wrongTable(d devState, sn storage.Snapshot) []string {
	var wrong []string
	switch {
	case d.err != nil:
		wrong = append(wrong, d.err.Error())
	default:
		if d.params.ID != sn.DeviceID {
			wrong = append(wrong, fmt.Sprintf("maps thin id %d", d.params.ID))
		}
		if c.poolDev != "" && d.params.PoolDev != c.poolDev {
			wrong = append(wrong, fmt.Sprintf("maps pool %s, not %s", d.params.PoolDev, c.poolDev))
		}
		if d.params.ExternalOrigin != "" {
			wrong = append(wrong, "has external origin "+d.params.ExternalOrigin)
		}
		if want := dmsetup.BytesToSectors(sn.Size); d.sectors != want {
			wrong = append(wrong, fmt.Sprintf("is %d sectors, not %d", d.sectors, want))
		}
	}
	if view := sn.Kind == snapshots.KindView; d.info.ReadOnly != view {
		wrong = append(wrong, fmt.Sprintf("read-only is %v for a %s snapshot", d.info.ReadOnly, sn.Kind))
	}
	return wrong
}

// missingDevices reports active snapshots and views without a dm device.
func (c *comparison) missingDevices() {
	for _, name := range sortedKeys(c.want) {
		if _, ok := c.st.devices[name]; ok {
			continue
		}
		sn := c.want[name]
		c.add(Finding{Kind: FindingMissingDevice, DeviceID: sn.DeviceID, Device: name, Key: sn.Key, Repairable: true,
			Message: fmt.Sprintf("%s snapshot %q has no dm device %s", sn.Kind, sn.Key, name)})
	}
}
