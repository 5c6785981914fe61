package storage

import (
	"reflect"
	"testing"
	"time"
)

// TestWarm: warm devices are recorded on allocated, unowned ids, listed
// oldest first and removed one by one; bad input writes nothing.
func TestWarm(t *testing.T) {
	clock := newTestClock()
	db, _ := openTestDB(t, withClock(clock.now))
	var a, b, owned uint32
	update(t, db, func(tx *Tx) error {
		var err error
		for _, p := range []*uint32{&a, &b, &owned} {
			if *p, err = tx.AllocateID(); err != nil {
				return err
			}
		}
		_, err = tx.CreateSnapshot(Snapshot{Key: "x", Kind: active, State: StateReady, DeviceID: owned})
		return err
	})
	given := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	update(t, db, func(tx *Tx) error {
		for _, tc := range []struct {
			w    Warm
			want string
		}{
			{Warm{DeviceID: b, Parent: "l", OriginID: 9, Size: 1 << 20}, ""},
			{Warm{DeviceID: a, Parent: "k", Size: 2 << 20, Created: given}, ""}, // older
			{Warm{DeviceID: a, Parent: "k"}, "exists"},
			{Warm{DeviceID: owned, Parent: "k"}, "precondition"},
			{Warm{DeviceID: 77, Parent: "k"}, "precondition"}, // not allocated
			{Warm{DeviceID: 0, Parent: "k"}, "invalid"},
			{Warm{DeviceID: MaxDeviceID + 1, Parent: "k"}, "invalid"},
			{Warm{DeviceID: a, Parent: ""}, "invalid"},
			{Warm{DeviceID: a, Parent: "k", OriginID: MaxDeviceID + 1}, "invalid"},
		} {
			if err := tx.AddWarm(tc.w); errKind(err) != tc.want {
				t.Errorf("AddWarm(%+v) = %v, want %q", tc.w, err, tc.want)
			}
		}
		return nil
	})
	want := []Warm{
		{DeviceID: a, Parent: "k", Size: 2 << 20, Created: given},
		{DeviceID: b, Parent: "l", OriginID: 9, Size: 1 << 20, Created: clock.last()},
	}
	view(t, db, func(tx *Tx) error {
		if got, err := tx.WarmDevices(); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("warm devices %+v %v, want %+v", got, err, want)
		}
		if _, err := tx.RemoveWarm(a); errKind(err) != "precondition" {
			t.Errorf("remove in a read transaction: %v", err)
		}
		return nil
	})
	update(t, db, func(tx *Tx) error {
		if got, err := tx.RemoveWarm(a); err != nil || !reflect.DeepEqual(got, want[0]) {
			t.Errorf("RemoveWarm(%d) = %+v %v", a, got, err)
		}
		if _, err := tx.RemoveWarm(a); errKind(err) != "notfound" {
			t.Errorf("second RemoveWarm: %v", err)
		}
		if got, err := tx.WarmDevices(); err != nil || !reflect.DeepEqual(got, want[1:]) {
			t.Errorf("warm devices %+v %v, want %+v", got, err, want[1:])
		}
		// Its id stays allocated for the removal that deletes the device.
		if used, err := tx.IDInUse(a); err != nil || !used {
			t.Errorf("id %d in use %v %v", a, used, err)
		}
		return nil
	})
}

// TestWarmCorrupt: a warm record that does not decode is DataLoss.
func TestWarmCorrupt(t *testing.T) {
	db, _ := openTestDB(t)
	update(t, db, func(tx *Tx) error { return tx.warm.Put(idKey(3), []byte{0xff}) })
	view(t, db, func(tx *Tx) error {
		if _, err := tx.WarmDevices(); errKind(err) != "dataloss" {
			t.Errorf("WarmDevices of a corrupt record: %v", err)
		}
		return nil
	})
}
