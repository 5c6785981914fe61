//go:build linux

package dmsetup

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Layout of struct dm_ioctl (include/uapi/linux/dm-ioctl.h). Offsets are
// written out rather than casting Go structs so that encoding is explicit and
// testable; ioctl_test.go checks them against unix.DmIoctl.
const (
	offVersion     = 0
	offDataSize    = 12
	offDataStart   = 16
	offTargetCount = 20
	offOpenCount   = 24
	offFlags       = 28
	offEventNr     = 32
	offDev         = 40
	offName        = 48
	offUUID        = offName + nameLen
	offData        = offUUID + uuidLen  // 305, struct dm_ioctl's data[7]
	headerSize     = unix.SizeofDmIoctl // 312, a multiple of 8

	nameLen = unix.DM_NAME_LEN // including the terminating NUL
	uuidLen = unix.DM_UUID_LEN

	// dm_target_spec: sector_start u64, length u64, status s32, next u32,
	// target_type [16]byte; parameters follow as a NUL-terminated string.
	specSize       = unix.SizeofDmTargetSpec
	maxTypeNameLen = unix.DM_MAX_TYPE_NAME

	// Offsets of the name inside dm_name_list and dm_target_versions.
	nameListNameOff      = 12
	targetVersionNameOff = 16

	// Initial buffer for calls that return data; grown on DM_BUFFER_FULL_FLAG.
	defaultDataSize = 16 << 10
	// Upper bound for buffer growth, far above anything a sane table needs.
	maxDataSize = 64 << 20
)

// We speak dm ioctl version 4; the kernel accepts any request whose minor is
// not newer than its own, so ask for 4.0.0 and read the real version back.
var requestVersion = [3]uint32{4, 0, 0}

var ne = binary.NativeEndian

// align8 rounds n up to a multiple of 8, the alignment the kernel uses
// between records.
func align8(n int) int { return (n + 7) &^ 7 }

// newBuffer returns a zeroed, 8-byte aligned buffer of at least size bytes.
// The kernel dereferences u64 fields inside it, so alignment matters.
func newBuffer(size int) []byte {
	words := make([]uint64, (size+7)/8)
	return unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
}

// request is one ioctl argument buffer: a dm_ioctl header followed by data.
type request struct {
	buf []byte
}

// newRequest builds a header for device name (may be empty) with room for
// dataSize bytes after the header.
func newRequest(name string, flags uint32, dataSize int) (*request, error) {
	if len(name) >= nameLen {
		return nil, fmt.Errorf("device name %q longer than %d bytes: %w", name, nameLen-1, unix.EINVAL)
	}
	r := &request{buf: newBuffer(headerSize + dataSize)}
	for i, v := range requestVersion {
		ne.PutUint32(r.buf[offVersion+4*i:], v)
	}
	ne.PutUint32(r.buf[offDataSize:], uint32(len(r.buf)))
	ne.PutUint32(r.buf[offDataStart:], headerSize)
	ne.PutUint32(r.buf[offFlags:], flags)
	copy(r.buf[offName:offName+nameLen-1], name)
	return r, nil
}

func (r *request) setUUID(uuid string) error {
	if len(uuid) >= uuidLen {
		return fmt.Errorf("uuid %q longer than %d bytes: %w", uuid, uuidLen-1, unix.EINVAL)
	}
	copy(r.buf[offUUID:offUUID+uuidLen-1], uuid)
	return nil
}

func (r *request) setTargetCount(n uint32) { ne.PutUint32(r.buf[offTargetCount:], n) }

// setEventNr sets the event_nr field of the header. In a resume or a
// remove the kernel hands it to udev as the cookie (see UdevFlags).
func (r *request) setEventNr(n uint32) { ne.PutUint32(r.buf[offEventNr:], n) }
func (r *request) flags() uint32       { return ne.Uint32(r.buf[offFlags:]) }
func (r *request) data() []byte        { return r.buf[headerSize:] }

// reply gives typed access to the header the kernel wrote back.
type reply struct {
	buf []byte
}

func (r reply) version() Version {
	return Version{ne.Uint32(r.buf[0:]), ne.Uint32(r.buf[4:]), ne.Uint32(r.buf[8:])}
}
func (r reply) dataSize() uint32    { return ne.Uint32(r.buf[offDataSize:]) }
func (r reply) dataStart() uint32   { return ne.Uint32(r.buf[offDataStart:]) }
func (r reply) targetCount() uint32 { return ne.Uint32(r.buf[offTargetCount:]) }
func (r reply) openCount() int32    { return int32(ne.Uint32(r.buf[offOpenCount:])) }
func (r reply) flags() uint32       { return ne.Uint32(r.buf[offFlags:]) }
func (r reply) eventNr() uint32     { return ne.Uint32(r.buf[offEventNr:]) }
func (r reply) dev() uint64         { return ne.Uint64(r.buf[offDev:]) }
func (r reply) name() string        { return cString(r.buf[offName : offName+nameLen]) }
func (r reply) uuid() string        { return cString(r.buf[offUUID : offUUID+uuidLen]) }

// payload returns the bytes the kernel produced after the header, bounded by
// the buffer actually passed in.
func (r reply) payload() ([]byte, error) {
	start, size := int(r.dataStart()), int(r.dataSize())
	if size == offData && start >= headerSize && start <= len(r.buf) {
		// The kernel resets data_size to where data begins and adds
		// nothing: a table status of a device without a table, say.
		return nil, nil
	}
	if start < headerSize || start > len(r.buf) || size < start || size > len(r.buf) {
		return nil, fmt.Errorf("malformed reply: data_start %d data_size %d buffer %d: %w", start, size, len(r.buf), ErrMalformed)
	}
	return r.buf[start:size], nil
}

func (r reply) info() Info {
	fl := r.flags()
	dev := r.dev()
	return Info{
		Name:           r.name(),
		UUID:           r.uuid(),
		Major:          unix.Major(dev),
		Minor:          unix.Minor(dev),
		OpenCount:      r.openCount(),
		EventNr:        r.eventNr(),
		TargetCount:    r.targetCount(),
		Suspended:      fl&unix.DM_SUSPEND_FLAG != 0,
		ReadOnly:       fl&unix.DM_READONLY_FLAG != 0,
		LiveTable:      fl&unix.DM_ACTIVE_PRESENT_FLAG != 0,
		InactiveTable:  fl&unix.DM_INACTIVE_PRESENT_FLAG != 0,
		DeferredRemove: fl&unix.DM_DEFERRED_REMOVE != 0,
	}
}

// cString returns the bytes of b up to the first NUL.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// encodeTargets writes dm_target_spec records for TABLE_LOAD. For loads,
// next is the offset from the start of the current spec to the following
// one, and newer kernels reject specs that are not 8-byte aligned.
func encodeTargets(targets []Target) ([]byte, error) {
	size := 0
	for _, t := range targets {
		if err := t.validate(); err != nil {
			return nil, err
		}
		size += align8(specSize + len(t.Params) + 1)
	}
	out := make([]byte, size)
	off := 0
	for _, t := range targets {
		rec := align8(specSize + len(t.Params) + 1)
		b := out[off : off+rec]
		ne.PutUint64(b[0:], uint64(t.Start))
		ne.PutUint64(b[8:], uint64(t.Length))
		ne.PutUint32(b[20:], uint32(rec))
		copy(b[24:24+maxTypeNameLen], t.Type)
		copy(b[specSize:], t.Params)
		off += rec
	}
	return out, nil
}

// decodeTargets parses the dm_target_spec records of a TABLE_STATUS reply.
// There next is the offset from the start of the data area, not from the
// current record. count is the target_count of the reply header.
func decodeTargets(data []byte, count uint32) ([]Target, error) {
	// count comes from the kernel: cap the allocation by what data can
	// hold, so that a wrong count cannot make us allocate a huge slice.
	targets := make([]Target, 0, min(int(count), len(data)/specSize))
	off := 0
	for i := range count {
		if off < 0 || off+specSize > len(data) {
			return nil, fmt.Errorf("target %d at offset %d beyond %d bytes of data: %w", i, off, len(data), ErrMalformed)
		}
		b := data[off:]
		t := Target{
			Start:  Sectors(ne.Uint64(b[0:])),
			Length: Sectors(ne.Uint64(b[8:])),
			Type:   cString(b[24 : 24+maxTypeNameLen]),
		}
		params := b[specSize:]
		before, _, ok := bytes.Cut(params, []byte{0})
		if !ok {
			return nil, fmt.Errorf("target %d parameters not terminated: %w", i, ErrMalformed)
		}
		t.Params = string(before)
		targets = append(targets, t)
		next := int(ne.Uint32(b[20:]))
		if i+1 < count && next <= off {
			return nil, fmt.Errorf("target %d next offset %d does not advance: %w", i, next, ErrMalformed)
		}
		off = next
	}
	return targets, nil
}

// decodeNameList walks the dm_name_list records of a LIST_DEVICES reply.
// Each record is {dev u64, next u32, name}; kernels since 4.14 append the
// event number and, since 5.13, flags and an optional uuid after the name,
// aligned to 8 bytes. next is relative to the current record and 0 ends the
// list; no data, or a first record with dev 0, means no devices.
func decodeNameList(data []byte) ([]Device, error) {
	var devices []Device
	if len(data) == 0 {
		return nil, nil // no devices: the kernel reports zero bytes
	}
	off := 0
	for {
		if off+nameListNameOff+1 > len(data) {
			return nil, fmt.Errorf("name list record at %d beyond %d bytes: %w", off, len(data), ErrMalformed)
		}
		rec := data[off:]
		dev := ne.Uint64(rec[0:])
		next := int(ne.Uint32(rec[8:]))
		if dev == 0 && off == 0 {
			return nil, nil
		}
		end := len(rec)
		if next != 0 {
			if next < nameListNameOff+1 || next > len(rec) || next%8 != 0 {
				return nil, fmt.Errorf("name list record at %d has bad next %d: %w", off, next, ErrMalformed)
			}
			end = next
		}
		rec = rec[:end]
		nameEnd := bytes.IndexByte(rec[nameListNameOff:], 0)
		if nameEnd < 0 {
			return nil, fmt.Errorf("name list record at %d: name not terminated: %w", off, ErrMalformed)
		}
		nameEnd += nameListNameOff
		d := Device{
			Name:  string(rec[nameListNameOff:nameEnd]),
			Major: unix.Major(dev),
			Minor: unix.Minor(dev),
		}
		// Kernels before 4.14 write nothing after the name: read the event
		// number and flags only when the record has room for them.
		tr := align8(nameEnd + 1)
		if tr+8 <= len(rec) {
			d.EventNr = ne.Uint32(rec[tr:])
			fl := ne.Uint32(rec[tr+4:])
			if fl&unix.DM_NAME_LIST_FLAG_HAS_UUID != 0 {
				u := rec[tr+8:]
				before, _, ok := bytes.Cut(u, []byte{0})
				if !ok {
					return nil, fmt.Errorf("name list record at %d: uuid not terminated: %w", off, ErrMalformed)
				}
				d.UUID = string(before)
			}
		}
		devices = append(devices, d)
		if next == 0 {
			return devices, nil
		}
		off += next
	}
}

// decodeTargetVersions walks the dm_target_versions records of a
// LIST_VERSIONS or GET_TARGET_VERSION reply: {next u32, version [3]u32, name}.
func decodeTargetVersions(data []byte) ([]targetVersion, error) {
	var out []targetVersion
	off := 0
	for {
		if off+targetVersionNameOff+1 > len(data) {
			if off == 0 && len(data) == 0 {
				return nil, nil
			}
			return nil, fmt.Errorf("target version record at %d beyond %d bytes: %w", off, len(data), ErrMalformed)
		}
		rec := data[off:]
		next := int(ne.Uint32(rec[0:]))
		name := rec[targetVersionNameOff:]
		before, _, ok := bytes.Cut(name, []byte{0})
		if !ok {
			return nil, fmt.Errorf("target version record at %d: name not terminated: %w", off, ErrMalformed)
		}
		out = append(out, targetVersion{
			Name:    string(before),
			Version: Version{ne.Uint32(rec[4:]), ne.Uint32(rec[8:]), ne.Uint32(rec[12:])},
		})
		if next == 0 {
			return out, nil
		}
		if next < targetVersionNameOff+1 || next > len(rec) {
			return nil, fmt.Errorf("target version record at %d has bad next %d: %w", off, next, ErrMalformed)
		}
		off += next
	}
}

// encodeMessage writes a dm_target_msg: sector u64 then the NUL-terminated text.
func encodeMessage(sector uint64, msg string) []byte {
	b := make([]byte, align8(8+len(msg)+1))
	ne.PutUint64(b, sector)
	copy(b[8:], msg)
	return b
}
