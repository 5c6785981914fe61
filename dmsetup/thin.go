package dmsetup

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Limits of dm-thin (Documentation/admin-guide/device-mapper/thin-provisioning.rst).
const (
	MinBlockSizeSectors = 128     // 64KiB
	MaxBlockSizeSectors = 2097152 // 1GiB
	BlockSizeMultiple   = 128
	maxThinID           = 1<<24 - 1 // thin ids have 24 bits
)

// PoolParams are the parameters of a thin-pool table line.
type PoolParams struct {
	MetadataDev      string // path or major:minor
	DataDev          string
	BlockSizeSectors uint32
	LowWaterMark     uint64 // in data blocks
	// Feature arguments: each is written in the table line when true.
	SkipBlockZeroing  bool
	IgnoreDiscard     bool
	NoDiscardPassdown bool
	ReadOnly          bool
	ErrorIfNoSpace    bool
}

var poolFeatures = []struct {
	name string
	get  func(*PoolParams) *bool
}{
	{"skip_block_zeroing", func(p *PoolParams) *bool { return &p.SkipBlockZeroing }},
	{"ignore_discard", func(p *PoolParams) *bool { return &p.IgnoreDiscard }},
	{"no_discard_passdown", func(p *PoolParams) *bool { return &p.NoDiscardPassdown }},
	{"read_only", func(p *PoolParams) *bool { return &p.ReadOnly }},
	{"error_if_no_space", func(p *PoolParams) *bool { return &p.ErrorIfNoSpace }},
}

// ValidateBlockSize checks a pool data block size in sectors.
func ValidateBlockSize(sectors uint32) error {
	if sectors < MinBlockSizeSectors || sectors > MaxBlockSizeSectors || sectors%BlockSizeMultiple != 0 {
		return fmt.Errorf("thin-pool block size %d sectors: must be a multiple of %d between %d and %d: %w",
			sectors, BlockSizeMultiple, MinBlockSizeSectors, MaxBlockSizeSectors, unix.EINVAL)
	}
	return nil
}

// checkDevArg refuses a device argument that would break the table line:
// an empty one, or one with whitespace or a NUL in it.
func checkDevArg(what, dev string) error {
	if dev == "" || strings.ContainsAny(dev, " \t\n\x00") {
		return fmt.Errorf("invalid %s device %q: %w", what, dev, unix.EINVAL)
	}
	return nil
}

// poolTable builds the thin-pool target covering length.
func poolTable(length Sectors, p PoolParams) (Target, error) {
	if err := checkDevArg("metadata", p.MetadataDev); err != nil {
		return Target{}, err
	}
	if err := checkDevArg("data", p.DataDev); err != nil {
		return Target{}, err
	}
	if err := ValidateBlockSize(p.BlockSizeSectors); err != nil {
		return Target{}, err
	}
	if length < Sectors(p.BlockSizeSectors) {
		return Target{}, fmt.Errorf("thin-pool length %d sectors is smaller than one block: %w", length, unix.EINVAL)
	}
	var feats []string
	for _, f := range poolFeatures {
		if *f.get(&p) {
			feats = append(feats, f.name)
		}
	}
	params := fmt.Sprintf("%s %s %d %d %d", p.MetadataDev, p.DataDev, p.BlockSizeSectors, p.LowWaterMark, len(feats))
	if len(feats) > 0 {
		params += " " + strings.Join(feats, " ")
	}
	return Target{Start: 0, Length: length, Type: "thin-pool", Params: params}, nil
}

// ParsePoolParams parses the parameters of a thin-pool table line as the
// kernel reports them (devices as major:minor).
func ParsePoolParams(params string) (PoolParams, error) {
	f := strings.Fields(params)
	bad := func(why string) (PoolParams, error) {
		return PoolParams{}, fmt.Errorf("thin-pool table %q: %s: %w", params, why, ErrMalformed)
	}
	if strings.ContainsRune(params, 0) {
		return bad("NUL byte")
	}
	if len(f) < 4 {
		return bad("fewer than 4 fields")
	}
	p := PoolParams{MetadataDev: f[0], DataDev: f[1]}
	bs, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil {
		return bad("block size")
	}
	p.BlockSizeSectors = uint32(bs)
	if p.LowWaterMark, err = strconv.ParseUint(f[3], 10, 64); err != nil {
		return bad("low water mark")
	}
	if len(f) == 4 {
		return p, nil
	}
	n, err := strconv.ParseUint(f[4], 10, 32)
	if err != nil || int(n) != len(f)-5 {
		return bad("feature count")
	}
	for _, arg := range f[5:] {
		known := false
		for _, pf := range poolFeatures {
			if arg == pf.name {
				*pf.get(&p) = true
				known = true
			}
		}
		if !known {
			return bad("unknown feature " + strconv.Quote(arg))
		}
	}
	return p, nil
}

// ThinParams are the parameters of a thin table line.
type ThinParams struct {
	PoolDev        string
	ID             uint32
	ExternalOrigin string
}

// ThinTable builds a thin target of length for device id in poolDev,
// optionally on top of a read-only external origin device.
func ThinTable(length Sectors, poolDev string, id uint32, externalOrigin string) (Target, error) {
	if err := checkDevArg("pool", poolDev); err != nil {
		return Target{}, err
	}
	if err := checkID(id); err != nil {
		return Target{}, err
	}
	if length == 0 {
		return Target{}, fmt.Errorf("thin device length is zero: %w", unix.EINVAL)
	}
	params := poolDev + " " + strconv.FormatUint(uint64(id), 10)
	if externalOrigin != "" {
		if err := checkDevArg("external origin", externalOrigin); err != nil {
			return Target{}, err
		}
		params += " " + externalOrigin
	}
	return Target{Start: 0, Length: length, Type: "thin", Params: params}, nil
}

// parseThinParams parses the parameters of a thin table line.
func parseThinParams(params string) (ThinParams, error) {
	f := strings.Fields(params)
	if len(f) < 2 || len(f) > 3 || strings.ContainsRune(params, 0) {
		return ThinParams{}, fmt.Errorf("thin table %q: want 2 or 3 fields: %w", params, ErrMalformed)
	}
	id, err := strconv.ParseUint(f[1], 10, 32)
	if err != nil || id > maxThinID {
		return ThinParams{}, fmt.Errorf("thin table %q: bad device id: %w", params, ErrMalformed)
	}
	p := ThinParams{PoolDev: f[0], ID: uint32(id)}
	if len(f) == 3 {
		p.ExternalOrigin = f[2]
	}
	return p, nil
}

// ThinTarget reads the table of thin device name: its parameters and
// length. A table that is not exactly one thin target is ErrMalformed.
func (c *Client) ThinTarget(name string) (ThinParams, Sectors, error) {
	t, err := c.singleTarget(name, "thin")
	if err != nil {
		return ThinParams{}, 0, err
	}
	tp, err := parseThinParams(t.Params)
	return tp, t.Length, err
}

// PoolTarget reads the table of thin-pool device name: its parameters (the
// kernel names devices major:minor) and length. A table that is not exactly
// one thin-pool target is ErrMalformed.
func (c *Client) PoolTarget(name string) (PoolParams, Sectors, error) {
	t, err := c.singleTarget(name, "thin-pool")
	if err != nil {
		return PoolParams{}, 0, err
	}
	pp, err := ParsePoolParams(t.Params)
	return pp, t.Length, err
}

// singleTarget is the only target of name's table, which must be of type
// typ.
func (c *Client) singleTarget(name, typ string) (Target, error) {
	table, err := c.Table(name)
	if err != nil {
		return Target{}, err
	}
	if len(table) != 1 || table[0].Type != typ {
		return Target{}, fmt.Errorf("table %v of %s is not one %s target: %w", table, name, typ, ErrMalformed)
	}
	return table[0], nil
}

// PoolMode is the mode field of a thin-pool status. A failed pool prints no
// mode (PoolStatus.Fail) and a pool needing thin_check says so in a field of
// its own (PoolStatus.NeedsCheck).
type PoolMode string

// Pool modes as the kernel prints them.
const (
	PoolModeRW             PoolMode = "rw"
	PoolModeRO             PoolMode = "ro"
	PoolModeOutOfDataSpace PoolMode = "out_of_data_space"
)

// DiscardMode is the discard field of a thin-pool status.
type DiscardMode string

// Discard modes as the kernel prints them.
const (
	DiscardPassdown   DiscardMode = "discard_passdown"
	NoDiscardPassdown DiscardMode = "no_discard_passdown"
	IgnoreDiscard     DiscardMode = "ignore_discard"
)

// NoSpacePolicy is what a full pool does with writes.
type NoSpacePolicy string

// No-space policies as the kernel prints them.
const (
	QueueIfNoSpace NoSpacePolicy = "queue_if_no_space"
	ErrorIfNoSpace NoSpacePolicy = "error_if_no_space"
)

// PoolStatus is the parsed status of a thin-pool target. Fields after
// HeldMetadataRoot are absent on older kernels and then left at their zero
// value (empty strings, Has* false).
type PoolStatus struct {
	// Fail is the bare "Fail" status of a failed pool; Error the bare
	// "Error" printed when the kernel could not read its metadata. All
	// other fields are zero when either is set.
	Fail  bool
	Error bool

	TransactionID    uint64
	UsedMetaBlocks   uint64 // 4KiB metadata blocks
	TotalMetaBlocks  uint64
	UsedDataBlocks   uint64 // pool data blocks
	TotalDataBlocks  uint64
	HeldMetadataRoot uint64
	HasHeldRoot      bool // false when the kernel printed "-"

	Mode          PoolMode
	DiscardMode   DiscardMode
	NoSpacePolicy NoSpacePolicy
	NeedsCheck    bool

	MetadataLowWatermark    uint64 // in metadata blocks, kernels >= 4.19
	HasMetadataLowWatermark bool
}

// ReadOnly reports whether the pool takes no more changes: failed, or
// read-only (needs_check, metadata full or a failed metadata write). The
// kernel then refuses pool messages and new data blocks.
func (s PoolStatus) ReadOnly() bool {
	return s.Fail || s.Error || s.NeedsCheck || s.Mode == PoolModeRO
}

// parseRatio reads "used/total", the form in which the kernel prints block
// counts.
func parseRatio(s string) (uint64, uint64, bool) {
	a, b, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, false
	}
	x, err1 := strconv.ParseUint(a, 10, 64)
	y, err2 := strconv.ParseUint(b, 10, 64)
	return x, y, err1 == nil && err2 == nil
}

// parsePoolStatus parses the status line of a thin-pool target:
//
//	<transaction id> <used meta>/<total meta> <used data>/<total data> <held root>|-
//	ro|rw|out_of_data_space ignore_discard|discard_passdown|no_discard_passdown
//	error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark>
//
// or the bare "Fail" / "Error". Trailing fields unknown to this parser, from
// newer kernels, are ignored.
func parsePoolStatus(s string) (PoolStatus, error) {
	f := strings.Fields(s)
	bad := func(why string) (PoolStatus, error) {
		return PoolStatus{}, fmt.Errorf("thin-pool status %q: %s: %w", s, why, ErrMalformed)
	}
	if len(f) == 1 {
		switch f[0] {
		case "Fail":
			return PoolStatus{Fail: true}, nil
		case "Error":
			return PoolStatus{Error: true}, nil
		}
	}
	if len(f) < 4 {
		return bad("fewer than 4 fields")
	}
	var st PoolStatus
	if why := st.parseRequiredFields(f[:4]); why != "" {
		return bad(why)
	}
	if why := st.parseOptionalFields(f[4:]); why != "" {
		return bad(why)
	}
	return st, nil
}

// parseRequiredFields reads the four fields every kernel prints: the
// transaction id, the metadata and data block counts and the held metadata
// root. It returns why a field is malformed, or "".
func (s *PoolStatus) parseRequiredFields(f []string) string {
	var err error
	var ok bool
	if s.TransactionID, err = strconv.ParseUint(f[0], 10, 64); err != nil {
		return "transaction id"
	}
	if s.UsedMetaBlocks, s.TotalMetaBlocks, ok = parseRatio(f[1]); !ok {
		return "metadata blocks"
	}
	if s.UsedDataBlocks, s.TotalDataBlocks, ok = parseRatio(f[2]); !ok {
		return "data blocks"
	}
	if f[3] != "-" {
		if s.HeldMetadataRoot, err = strconv.ParseUint(f[3], 10, 64); err != nil {
			return "held metadata root"
		}
		s.HasHeldRoot = true
	}
	return ""
}

// parseOptionalFields reads the fields after the held metadata root, in
// order: mode, discard mode, no-space policy, needs_check and the metadata
// low watermark. Older kernels print fewer of them, so a missing field is
// left at its zero value; fields beyond these are ignored. It returns why a
// field is malformed, or "".
func (s *PoolStatus) parseOptionalFields(f []string) string {
	var ok bool
	if len(f) > 0 {
		if s.Mode, ok = oneOf(f[0], PoolModeRW, PoolModeRO, PoolModeOutOfDataSpace); !ok {
			return "mode " + strconv.Quote(f[0])
		}
	}
	if len(f) > 1 {
		if s.DiscardMode, ok = oneOf(f[1], DiscardPassdown, NoDiscardPassdown, IgnoreDiscard); !ok {
			return "discard mode " + strconv.Quote(f[1])
		}
	}
	if len(f) > 2 {
		if s.NoSpacePolicy, ok = oneOf(f[2], QueueIfNoSpace, ErrorIfNoSpace); !ok {
			return "no-space policy " + strconv.Quote(f[2])
		}
	}
	if len(f) > 3 {
		switch f[3] {
		case "needs_check":
			s.NeedsCheck = true
		case "-":
		default:
			return "needs_check field " + strconv.Quote(f[3])
		}
	}
	if len(f) > 4 {
		v, err := strconv.ParseUint(f[4], 10, 64)
		if err != nil {
			return "metadata low watermark"
		}
		s.MetadataLowWatermark, s.HasMetadataLowWatermark = v, true
	}
	return ""
}

// oneOf returns v as a T when it is one of allowed, and the zero T and
// false when it is not.
func oneOf[T ~string](v string, allowed ...T) (T, bool) {
	if slices.Contains(allowed, T(v)) {
		return T(v), true
	}
	return "", false
}

// ThinStatus is the parsed status of a thin target.
type ThinStatus struct {
	Fail          bool
	MappedSectors Sectors
	HighestMapped Sectors // last mapped sector, valid if HasHighest
	HasHighest    bool    // false when nothing is mapped ("-")
}

// parseThinStatus parses "<mapped sectors> <highest mapped sector>|-" or
// "Fail". Trailing fields of newer kernels are ignored.
func parseThinStatus(s string) (ThinStatus, error) {
	f := strings.Fields(s)
	if len(f) == 1 && f[0] == "Fail" {
		return ThinStatus{Fail: true}, nil
	}
	if len(f) < 2 {
		return ThinStatus{}, fmt.Errorf("thin status %q: want 2 fields: %w", s, ErrMalformed)
	}
	var st ThinStatus
	mapped, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		return ThinStatus{}, fmt.Errorf("thin status %q: mapped sectors: %w", s, ErrMalformed)
	}
	st.MappedSectors = Sectors(mapped)
	if f[1] != "-" {
		highest, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return ThinStatus{}, fmt.Errorf("thin status %q: highest mapped sector: %w", s, ErrMalformed)
		}
		st.HighestMapped, st.HasHighest = Sectors(highest), true
	}
	return st, nil
}

// singleTargetStatus returns the status of a device whose table is exactly
// one target of type typ.
func (c *Client) singleTargetStatus(name, typ string, flags uint32) (string, error) {
	sts, err := c.status(name, flags)
	if err != nil {
		return "", err
	}
	if len(sts) != 1 || sts[0].Type != typ {
		types := make([]string, len(sts))
		for i, s := range sts {
			types[i] = s.Type
		}
		return "", opError("status", name, fmt.Errorf("want a single %s target, table has %v: %w", typ, types, unix.EINVAL))
	}
	return sts[0].Status, nil
}

// PoolStatus returns the parsed status of thin-pool device pool. The kernel
// commits pending metadata before answering.
func (c *Client) PoolStatus(pool string) (PoolStatus, error) {
	return c.poolStatus(pool, 0)
}

// PoolStatusNoCommit is PoolStatus without the metadata commit, which costs
// the kernel about as much as a pool message. The used space it reports may
// then miss the blocks mapped since the last commit; every pool message
// commits, and the pool commits at least once a second.
func (c *Client) PoolStatusNoCommit(pool string) (PoolStatus, error) {
	return c.poolStatus(pool, unix.DM_NOFLUSH_FLAG)
}

// poolStatus is PoolStatus with the ioctl flags as a parameter.
func (c *Client) poolStatus(pool string, flags uint32) (PoolStatus, error) {
	s, err := c.singleTargetStatus(pool, "thin-pool", flags)
	if err != nil {
		return PoolStatus{}, err
	}
	st, err := parsePoolStatus(s)
	return st, opError("status", pool, err)
}

// ThinStatus returns the parsed status of thin device name.
func (c *Client) ThinStatus(name string) (ThinStatus, error) {
	s, err := c.singleTargetStatus(name, "thin", 0)
	if err != nil {
		return ThinStatus{}, err
	}
	st, err := parseThinStatus(s)
	return st, opError("status", name, err)
}

// poolMessage sends msg to the thin-pool target of device pool, at sector
// 0 where its one target starts. The kernel commits the pool's metadata
// after a message but ignores a failed commit: the message then reports
// success while the pool has rolled the change back and gone read-only or
// failed. So a success stands only if the pool can still commit
// afterwards; otherwise the message fails with EIO.
func (c *Client) poolMessage(pool, msg string) error {
	if _, err := c.message(pool, 0, msg); err != nil {
		return err
	}
	st, err := c.PoolStatusNoCommit(pool)
	if err != nil {
		return fmt.Errorf("status after message %q: %w", msg, err)
	}
	if st.ReadOnly() {
		return opError("message "+strconv.Quote(msg), pool,
			fmt.Errorf("pool status %q after it: its metadata commit failed, the change may be rolled back: %w", st, unix.EIO))
	}
	return nil
}

// checkID refuses a thin device id the pool cannot hold: ids have 24 bits.
func checkID(id uint32) error {
	if id > maxThinID {
		return fmt.Errorf("thin device id %d exceeds %d: %w", id, maxThinID, unix.EINVAL)
	}
	return nil
}

// CreateThin creates thin device id in pool; EEXIST if the id is taken.
func (c *Client) CreateThin(pool string, id uint32) error {
	if err := checkID(id); err != nil {
		return opError("create_thin", pool, err)
	}
	return c.poolMessage(pool, "create_thin "+strconv.FormatUint(uint64(id), 10))
}

// CreateSnap creates thin device id as a snapshot of origin. An active
// origin must be suspended around the call.
func (c *Client) CreateSnap(pool string, id, origin uint32) error {
	if err := checkID(id); err != nil {
		return opError("create_snap", pool, err)
	}
	if err := checkID(origin); err != nil {
		return opError("create_snap", pool, err)
	}
	return c.poolMessage(pool, fmt.Sprintf("create_snap %d %d", id, origin))
}

// DeleteThin deletes thin device id from pool; ENODATA if it does not exist.
// The device must not be active.
func (c *Client) DeleteThin(pool string, id uint32) error {
	if err := checkID(id); err != nil {
		return opError("delete", pool, err)
	}
	return c.poolMessage(pool, "delete "+strconv.FormatUint(uint64(id), 10))
}

// SetTransactionID replaces the pool's transaction id old with next; EINVAL
// if old is not the current id.
func (c *Client) SetTransactionID(pool string, old, next uint64) error {
	return c.poolMessage(pool, fmt.Sprintf("set_transaction_id %d %d", old, next))
}

// ReserveMetadataSnap takes a metadata snapshot for userspace tools.
func (c *Client) ReserveMetadataSnap(pool string) error {
	return c.poolMessage(pool, "reserve_metadata_snap")
}

// ReleaseMetadataSnap releases the metadata snapshot.
func (c *Client) ReleaseMetadataSnap(pool string) error {
	return c.poolMessage(pool, "release_metadata_snap")
}

// String formats s the way the kernel prints it, stopping at the first
// absent optional field.
func (s PoolStatus) String() string {
	switch {
	case s.Fail:
		return "Fail"
	case s.Error:
		return "Error"
	}
	held := "-"
	if s.HasHeldRoot {
		held = strconv.FormatUint(s.HeldMetadataRoot, 10)
	}
	out := fmt.Sprintf("%d %d/%d %d/%d %s", s.TransactionID, s.UsedMetaBlocks, s.TotalMetaBlocks,
		s.UsedDataBlocks, s.TotalDataBlocks, held)
	for _, v := range []string{string(s.Mode), string(s.DiscardMode), string(s.NoSpacePolicy)} {
		if v == "" {
			return out
		}
		out += " " + v
	}
	if s.NeedsCheck {
		out += " needs_check"
	} else {
		out += " -"
	}
	if s.HasMetadataLowWatermark {
		out += " " + strconv.FormatUint(s.MetadataLowWatermark, 10)
	}
	return out
}

// String formats s the way the kernel prints it.
func (s ThinStatus) String() string {
	if s.Fail {
		return "Fail"
	}
	if !s.HasHighest {
		return strconv.FormatUint(uint64(s.MappedSectors), 10) + " -"
	}
	return fmt.Sprintf("%d %d", s.MappedSectors, s.HighestMapped)
}
