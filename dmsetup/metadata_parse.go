package dmsetup

import (
	"bufio"
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ueventDevName returns DEVNAME of a sysfs uevent file, when it is a
// plain name under /dev.
func ueventDevName(b []byte) (string, bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if name, ok := strings.CutPrefix(sc.Text(), "DEVNAME="); ok {
			clean := filepath.Clean(name)
			if !filepath.IsLocal(name) || clean == "." {
				return "", false
			}
			return clean, true
		}
	}
	return "", false
}

// parseThinLs reads `thin_ls --no-headers -o DEV`: one id a line.
func parseThinLs(out []byte) ([]uint32, error) {
	var ids []uint32
	for line := range strings.SplitSeq(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		id, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil || len(f) != 1 || id > maxThinID {
			return nil, fmt.Errorf("thin_ls: unexpected line %q: %w", line, ErrMalformed)
		}
		ids = append(ids, uint32(id))
	}
	slices.Sort(ids)
	return ids, nil
}

// parseThinDump reads the dev_id of every <device> of thin_dump's XML.
func parseThinDump(out []byte) ([]uint32, error) {
	dec := xml.NewDecoder(bytes.NewReader(out))
	var ids []uint32
	sawSuperblock := false
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("thin_dump: %w: %w", err, ErrMalformed)
		}
		el, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		switch el.Name.Local {
		case "superblock":
			sawSuperblock = true
		case "device":
			found := false
			for _, a := range el.Attr {
				if a.Name.Local != "dev_id" {
					continue
				}
				id, err := strconv.ParseUint(a.Value, 10, 32)
				if err != nil || id > maxThinID {
					return nil, fmt.Errorf("thin_dump: dev_id %q: %w", a.Value, ErrMalformed)
				}
				ids = append(ids, uint32(id))
				found = true
			}
			if !found {
				return nil, fmt.Errorf("thin_dump: device without dev_id: %w", ErrMalformed)
			}
		}
	}
	if !sawSuperblock {
		return nil, fmt.Errorf("thin_dump: no superblock element: %w", ErrMalformed)
	}
	slices.Sort(ids)
	return ids, nil
}
