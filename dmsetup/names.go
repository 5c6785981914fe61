package dmsetup

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// DeviceNamePrefix starts the name of every thin device of pool.
func DeviceNamePrefix(pool string) string { return pool + "-snap-" }

// DeviceName is the dm name of thin device id of pool: <pool>-snap-<id>.
// Built from the pool and the id only, so no caller-supplied string ever
// reaches a device name.
func DeviceName(pool string, id uint32) string {
	return DeviceNamePrefix(pool) + strconv.FormatUint(uint64(id), 10)
}

// ParseDeviceName returns the thin id in name when name is exactly
// DeviceName(pool, id) for an id up to maxThinID (no sign, no leading
// zeros, nothing after the id).
func ParseDeviceName(pool, name string) (uint32, bool) {
	rest, ok := strings.CutPrefix(name, DeviceNamePrefix(pool))
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 32)
	if err != nil || n > maxThinID || DeviceName(pool, uint32(n)) != name {
		return 0, false
	}
	return uint32(n), true
}

// UUIDPrefix starts the dm uuid of every device we make, as LVM's start with
// "LVM-": tools and udev rules can tell our devices from others'.
const UUIDPrefix = "THIN-"

// DeviceUUID is the dm uuid of thin device id of pool:
// THIN-<12 hex digits of the pool name's SHA-256>-<id>, unique per pool and
// id and short for any pool name.
func DeviceUUID(pool string, id uint32) string {
	sum := sha256.Sum256([]byte(pool))
	return UUIDPrefix + hex.EncodeToString(sum[:6]) + "-" + strconv.FormatUint(uint64(id), 10)
}

// MajorMinor is how tables and sysfs name a block device: "major:minor".
// Unlike a path it needs no node in /dev, so it works without udev.
func MajorMinor(major, minor uint32) string {
	return strconv.FormatUint(uint64(major), 10) + ":" + strconv.FormatUint(uint64(minor), 10)
}

// parseMajorMinor is the inverse of MajorMinor.
func parseMajorMinor(s string) (uint32, uint32, error) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not major:minor: %w", s, ErrMalformed)
	}
	major, err1 := strconv.ParseUint(a, 10, 32)
	minor, err2 := strconv.ParseUint(b, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("%q is not major:minor: %w", s, ErrMalformed)
	}
	return uint32(major), uint32(minor), nil
}
