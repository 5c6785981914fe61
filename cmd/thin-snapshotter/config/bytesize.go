package config

import (
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
)

// Binary size units.
const (
	kib ByteSize = 1 << (10 * (iota + 1))
	mib
	gib
	tib
	pib
)

// ByteSize is a size in bytes that reads and writes human units in TOML.
//
// Accepted forms (units are case-insensitive, optional space before the
// unit, the number must be a whole number):
//
//	1048576            plain bytes (a TOML integer or a string)
//	512B               bytes
//	64KiB 10GiB 2TiB   binary units: KiB MiB GiB TiB PiB
//	64K 10G 2T         single letters are binary too (as in LVM and dd)
//	500KB 10GB 1TB     two-letter SI units are decimal: 10GB = 10*1000^3
//
// Fractions ("1.5GiB"), negative numbers and unknown units are rejected;
// write 1536MiB instead of 1.5GiB.
type ByteSize uint64

var byteUnits = map[string]uint64{
	"":    1,
	"b":   1,
	"k":   1 << 10,
	"kib": 1 << 10,
	"m":   1 << 20,
	"mib": 1 << 20,
	"g":   1 << 30,
	"gib": 1 << 30,
	"t":   1 << 40,
	"tib": 1 << 40,
	"p":   1 << 50,
	"pib": 1 << 50,
	"kb":  1e3,
	"mb":  1e6,
	"gb":  1e9,
	"tb":  1e12,
	"pb":  1e15,
}

// parseByteSize parses s in one of the forms documented on ByteSize.
func parseByteSize(s string) (ByteSize, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("invalid size %q: empty", s)
	}
	i := 0
	for i < len(in) && in[i] >= '0' && in[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("invalid size %q: must start with a whole number of bytes or units (e.g. 64MiB, 10GiB, 1048576)", s)
	}
	num, unit := in[:i], strings.ToLower(strings.TrimSpace(in[i:]))
	if strings.HasPrefix(unit, ".") || strings.HasPrefix(unit, ",") {
		return 0, fmt.Errorf("invalid size %q: fractions are not supported, use a smaller unit (e.g. 1536MiB instead of 1.5GiB)", s)
	}
	mult, ok := byteUnits[unit]
	if !ok {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q (use B, KiB, MiB, GiB, TiB, PiB; K/M/G/T/P are binary, KB/MB/GB/TB/PB decimal)", s, strings.TrimSpace(in[i:]))
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: number out of range", s)
	}
	hi, v := bits.Mul64(n, mult)
	if hi != 0 {
		return 0, fmt.Errorf("invalid size %q: larger than %d bytes", s, uint64(math.MaxUint64))
	}
	return ByteSize(v), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *ByteSize) UnmarshalText(text []byte) error {
	v, err := parseByteSize(string(text))
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// MarshalText implements encoding.TextMarshaler; it uses the largest binary
// unit that represents the size exactly, so the text parses back to the same
// value.
func (b ByteSize) MarshalText() ([]byte, error) {
	return []byte(b.String()), nil
}

// String returns the size as MarshalText writes it.
func (b ByteSize) String() string {
	units := []struct {
		name string
		size ByteSize
	}{{"PiB", pib}, {"TiB", tib}, {"GiB", gib}, {"MiB", mib}, {"KiB", kib}}
	if b != 0 {
		for _, u := range units {
			if b%u.size == 0 {
				return strconv.FormatUint(uint64(b/u.size), 10) + u.name
			}
		}
	}
	return strconv.FormatUint(uint64(b), 10)
}
