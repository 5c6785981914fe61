package imagegen

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// readLayout reads an OCI layout tarball into name → content.
func readLayout(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func TestWrite(t *testing.T) {
	img := Image{
		Ref: "example.com/test/img:v1",
		Layers: []Layer{
			{Gzip: true, Entries: []Entry{
				Dir("d", 0o755),
				File("d/a", 0o644, "a\n"),
				Hardlink("d/b", "d/a"),
				Symlink("d/s", "a"),
				{Path: "x", Type: tar.TypeReg, Mode: 0o600, UID: 7, GID: 8, Data: []byte("x"), Xattrs: map[string]string{"user.k": "v"}},
			}},
			{Entries: []Entry{
				Whiteout("d/a"),
				Opaque("d"),
				{Path: "big", Type: tar.TypeReg, Mode: 0o644, Size: 100000, Content: func() io.Reader { return PseudoRandom(1, 100000) }},
			}},
		},
	}
	var buf bytes.Buffer
	res, err := Write(&buf, t.TempDir(), img)
	if err != nil {
		t.Fatal(err)
	}
	files := readLayout(t, buf.Bytes())

	var layout ocispec.ImageLayout
	if err := json.Unmarshal(files["oci-layout"], &layout); err != nil || layout.Version != ocispec.ImageLayoutVersion {
		t.Fatalf("oci-layout: %+v, %v", layout, err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].Digest != res.Manifest.Digest ||
		idx.Manifests[0].Annotations[ocispec.AnnotationRefName] != img.Ref {
		t.Fatalf("index: %+v", idx)
	}
	// Every blob is stored under its own digest.
	blob := func(d string) []byte {
		t.Helper()
		b, ok := files["blobs/sha256/"+d[len("sha256:"):]]
		if !ok {
			t.Fatalf("blob %s missing", d)
		}
		if sha(b) != d {
			t.Fatalf("blob %s has digest %s", d, sha(b))
		}
		return b
	}
	var man ocispec.Manifest
	if err := json.Unmarshal(blob(res.Manifest.Digest.String()), &man); err != nil {
		t.Fatal(err)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(blob(man.Config.Digest.String()), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" || len(cfg.RootFS.DiffIDs) != 2 {
		t.Fatalf("config: %+v", cfg)
	}

	wantTypes := []string{ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayer}
	var headers [][]*tar.Header
	chain := ""
	for i, l := range man.Layers {
		if l.MediaType != wantTypes[i] {
			t.Errorf("layer %d media type %s, want %s", i, l.MediaType, wantTypes[i])
		}
		raw := blob(l.Digest.String())
		if int64(len(raw)) != l.Size {
			t.Errorf("layer %d size %d, descriptor says %d", i, len(raw), l.Size)
		}
		if l.MediaType == ocispec.MediaTypeImageLayerGzip {
			zr, err := gzip.NewReader(bytes.NewReader(raw))
			if err != nil {
				t.Fatal(err)
			}
			if raw, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
		}
		if got := sha(raw); got != cfg.RootFS.DiffIDs[i].String() || got != res.DiffIDs[i].String() {
			t.Errorf("layer %d diff id %s, config says %s, result %s", i, got, cfg.RootFS.DiffIDs[i], res.DiffIDs[i])
		}
		// Chain IDs by their definition in the image spec.
		if i == 0 {
			chain = res.DiffIDs[0].String()
		} else {
			chain = sha([]byte(chain + " " + res.DiffIDs[i].String()))
		}
		if res.ChainIDs[i].String() != chain {
			t.Errorf("chain id %d = %s, want %s", i, res.ChainIDs[i], chain)
		}
		var hs []*tar.Header
		tr := tar.NewReader(bytes.NewReader(raw))
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			hs = append(hs, h)
		}
		headers = append(headers, hs)
	}

	tests := []struct {
		layer             int
		name              string
		typ               byte
		link              string
		mode              int64
		uid, gid          int
		xattr, xattrValue string
		size              int64
	}{
		{layer: 0, name: "d/", typ: tar.TypeDir, mode: 0o755},
		{layer: 0, name: "d/a", typ: tar.TypeReg, mode: 0o644, size: 2},
		{layer: 0, name: "d/b", typ: tar.TypeLink, link: "d/a", mode: 0o644},
		{layer: 0, name: "d/s", typ: tar.TypeSymlink, link: "a", mode: 0o777},
		{layer: 0, name: "x", typ: tar.TypeReg, mode: 0o600, uid: 7, gid: 8, xattr: "SCHILY.xattr.user.k", xattrValue: "v", size: 1},
		{layer: 1, name: "d/.wh.a", typ: tar.TypeReg, mode: 0o644},
		{layer: 1, name: "d/.wh..wh..opq", typ: tar.TypeReg, mode: 0o644},
		{layer: 1, name: "big", typ: tar.TypeReg, mode: 0o644, size: 100000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var h *tar.Header
			for _, c := range headers[tc.layer] {
				if c.Name == tc.name {
					h = c
				}
			}
			if h == nil {
				t.Fatalf("layer %d has no %s", tc.layer, tc.name)
			}
			if h.Typeflag != tc.typ || h.Linkname != tc.link || h.Mode != tc.mode || h.Uid != tc.uid || h.Gid != tc.gid || h.Size != tc.size {
				t.Errorf("header %+v", h)
			}
			if tc.xattr != "" && h.PAXRecords[tc.xattr] != tc.xattrValue {
				t.Errorf("PAX %s = %q, want %q", tc.xattr, h.PAXRecords[tc.xattr], tc.xattrValue)
			}
		})
	}
}

func TestWriteRejects(t *testing.T) {
	tests := []struct {
		name  string
		entry Entry
	}{
		{"absolute path", File("/etc/x", 0o644, "")},
		{"unclean path", File("a/../b", 0o644, "")},
		{"short content", Entry{Path: "f", Type: tar.TypeReg, Size: 10, Content: func() io.Reader { return bytes.NewReader([]byte("abc")) }}},
		{"unknown type", Entry{Path: "f", Type: tar.TypeChar}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Write(io.Discard, t.TempDir(), Image{Ref: "a/b:c", Layers: []Layer{{Entries: []Entry{tc.entry}}}})
			if err == nil {
				t.Fatal("Write succeeded")
			}
		})
	}
}

func TestPseudoRandom(t *testing.T) {
	whole, err := io.ReadAll(PseudoRandom(42, 1000))
	if err != nil {
		t.Fatal(err)
	}
	if len(whole) != 1000 {
		t.Fatalf("got %d bytes", len(whole))
	}
	// Reads of any size give the same stream.
	r := PseudoRandom(42, 1000)
	var pieces []byte
	for _, n := range []int{1, 3, 8, 13, 975} {
		p := make([]byte, n)
		if _, err := io.ReadFull(r, p); err != nil {
			t.Fatal(err)
		}
		pieces = append(pieces, p...)
	}
	if !bytes.Equal(whole, pieces) {
		t.Error("stream depends on read sizes")
	}
	other, _ := io.ReadAll(PseudoRandom(43, 1000))
	if bytes.Equal(whole, other) {
		t.Error("different seeds, same stream")
	}
	var zr bytes.Buffer
	zw := gzip.NewWriter(&zr)
	_, _ = zw.Write(whole)
	_ = zw.Close()
	if zr.Len() < len(whole) {
		t.Errorf("compresses to %d of %d bytes: not random-looking", zr.Len(), len(whole))
	}
}

func TestIsStatic(t *testing.T) {
	tests := []struct {
		path string
		want bool
	}{
		{"/bin/busybox", true},
		{"/bin/ls", false},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			data, err := os.ReadFile(tc.path)
			if err != nil {
				t.Skipf("%s: %v", tc.path, err)
			}
			if got := isStatic(data); got != tc.want {
				t.Errorf("isStatic(%s) = %v, want %v", tc.path, got, tc.want)
			}
		})
	}
	if isStatic([]byte("#!/bin/sh\n")) {
		t.Error("a script is not a static ELF")
	}
}
