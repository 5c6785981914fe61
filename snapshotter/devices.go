package snapshotter

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/thin-snapshotter/thin-snapshotter/dmsetup"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// Device is one thin device the snapshotter knows of. Sizes are bytes.
type Device struct {
	ID   uint32
	Name string // dm name
	// Key of the snapshot; empty for the base and pending removals.
	Key string
	// Kind is one of the Kind constants; empty for a pending removal.
	Kind string
	// State is "ready", "creating" or "removing" for a record;
	// "removing" also for a journaled removal whose record is gone
	// already; or "warm" for a device made ahead for the next child of
	// committed snapshot Key.
	State string
	// Active says the dm device exists; OpenCount, ReadOnly and
	// MappedBytes are only known then.
	Active      bool
	OpenCount   int32
	ReadOnly    bool
	MappedBytes uint64
	VirtualSize uint64
}

// DeviceWarm is the State of a warm device.
const DeviceWarm = "warm"

// Devices lists the thin devices of the records, the base device, the
// warm devices and the pending removals, by id, with the state of their dm devices.
func (s *Snapshotter) Devices(ctx context.Context) ([]Device, error) {
	byID := map[uint32]*Device{}
	if err := s.db.View(ctx, func(tx *storage.Tx) error {
		pi, err := tx.PoolInfo()
		if err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if pi.BaseDeviceID != 0 {
			byID[pi.BaseDeviceID] = &Device{ID: pi.BaseDeviceID, Kind: KindBase, State: storage.StateReady.String(), VirtualSize: pi.BaseSize}
		}
		entries, err := tx.Journal()
		if err != nil {
			return err
		}
		for _, e := range entries {
			if e.Op == storage.OpDelete {
				byID[e.DeviceID] = &Device{ID: e.DeviceID, State: storage.StateRemoving.String()}
			}
		}
		warm, err := tx.WarmDevices()
		if err != nil {
			return err
		}
		for _, w := range warm {
			byID[w.DeviceID] = &Device{ID: w.DeviceID, Key: w.Parent, State: DeviceWarm, VirtualSize: w.Size}
		}
		return tx.WalkSnapshots(func(sn storage.Snapshot) error {
			if sharesDevice(sn) {
				return nil // its layer's device is listed
			}
			byID[sn.DeviceID] = &Device{ID: sn.DeviceID, Key: sn.Key, Kind: kindName(sn.Kind), State: sn.State.String(), VirtualSize: sn.Size}
			return nil
		})
	}); err != nil {
		return nil, err
	}
	out := make([]Device, 0, len(byID))
	for _, id := range sortedKeys(byID) {
		d := byID[id]
		d.Name = s.deviceName(id)
		info, err := s.pool.Info(d.Name)
		switch {
		case err == nil:
			d.Active, d.OpenCount, d.ReadOnly = true, info.OpenCount, info.ReadOnly
			if ts, err := s.pool.ThinStatus(d.Name); err == nil {
				d.MappedBytes = ts.MappedSectors.Bytes()
			} else if !dmsetup.IsNotFound(err) {
				return nil, fmt.Errorf("status of %s: %w", d.Name, err)
			}
		case !dmsetup.IsNotFound(err):
			return nil, fmt.Errorf("dm device %s: %w", d.Name, err)
		}
		out = append(out, *d)
	}
	return out, nil
}
