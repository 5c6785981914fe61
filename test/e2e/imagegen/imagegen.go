// Package imagegen writes OCI image layout tarballs, as `ctr images import`
// reads them, from layers described in Go: no registry, no network. The
// end-to-end test and the demo build their images with it.
package imagegen

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Entry is one member of a layer tarball.
type Entry struct {
	// Path inside the image, without a leading slash.
	Path string
	// Type is a tar type flag: tar.TypeReg, TypeDir, TypeSymlink, TypeLink.
	Type byte
	Mode int64
	UID  int
	GID  int
	// Data is the content of a small regular file.
	Data []byte
	// Size and Content describe a large regular file instead of Data:
	// Content is called once and must yield exactly Size bytes.
	Size    int64
	Content func() io.Reader
	// Linkname is the target of a symlink, or the path (in this layer) of
	// the file a hardlink shares its inode with.
	Linkname string
	// Xattrs are extended attributes, written as SCHILY.xattr PAX records.
	Xattrs map[string]string
}

// Layer is one image layer.
type Layer struct {
	Entries []Entry
	// Gzip stores the layer compressed (tar+gzip media type).
	Gzip bool
	// Comment is the layer's history entry.
	Comment string
}

// Image describes an image for Write.
type Image struct {
	// Ref is the full reference the image is imported as, e.g.
	// "docker.io/thin/e2e:latest".
	Ref    string
	Layers []Layer
	Config ocispec.ImageConfig
}

// Result tells what Write produced.
type Result struct {
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layers   []ocispec.Descriptor
	// DiffIDs are the digests of the uncompressed layers; ChainIDs the
	// snapshot keys containerd commits them under, bottom first.
	DiffIDs  []digest.Digest
	ChainIDs []digest.Digest
}

// Epoch is the modification time of every entry: fixed, so images are
// reproducible.
var Epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// Write writes img as an OCI image layout tarball to w. Layer blobs are
// staged in tmpDir, because the outer tarball needs their sizes up front.
func Write(w io.Writer, tmpDir string, img Image) (Result, error) {
	var res Result
	type blob struct {
		desc ocispec.Descriptor
		file string
	}
	var blobs []blob
	for i, l := range img.Layers {
		f, err := os.CreateTemp(tmpDir, "layer-*")
		if err != nil {
			return res, err
		}
		defer os.Remove(f.Name())
		desc, diffID, err := writeLayer(f, l)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return res, fmt.Errorf("layer %d: %w", i, err)
		}
		res.Layers = append(res.Layers, desc)
		res.DiffIDs = append(res.DiffIDs, diffID)
		blobs = append(blobs, blob{desc, f.Name()})
	}
	res.ChainIDs = identity.ChainIDs(append([]digest.Digest(nil), res.DiffIDs...))

	created := Epoch
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   img.Config,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: res.DiffIDs},
	}
	for _, l := range img.Layers {
		cfg.History = append(cfg.History, ocispec.History{Created: &created, Comment: l.Comment})
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return res, err
	}
	res.Config = descriptorOf(ocispec.MediaTypeImageConfig, cfgJSON)

	man := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    res.Config,
		Layers:    res.Layers,
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return res, err
	}
	res.Manifest = descriptorOf(ocispec.MediaTypeImageManifest, manJSON)
	res.Manifest.Platform = &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	// Both annotations carry the full reference: containerd takes a full
	// reference as the image name and would prefix a bare tag.
	res.Manifest.Annotations = map[string]string{
		ocispec.AnnotationRefName:  img.Ref,
		"io.containerd.image.name": img.Ref,
	}
	idx := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{res.Manifest},
	}
	idxJSON, err := json.Marshal(idx)
	if err != nil {
		return res, err
	}
	layout, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return res, err
	}

	tw := tar.NewWriter(w)
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: Epoch}); err != nil {
			return res, err
		}
	}
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)), ModTime: Epoch}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := put(ocispec.ImageLayoutFile, layout); err != nil {
		return res, err
	}
	for _, b := range blobs {
		if err := copyBlob(tw, b.desc, b.file); err != nil {
			return res, err
		}
	}
	if err := put(blobPath(res.Config.Digest), cfgJSON); err != nil {
		return res, err
	}
	if err := put(blobPath(res.Manifest.Digest), manJSON); err != nil {
		return res, err
	}
	if err := put(ocispec.ImageIndexFile, idxJSON); err != nil {
		return res, err
	}
	return res, tw.Close()
}

func blobPath(d digest.Digest) string {
	return "blobs/" + d.Algorithm().String() + "/" + d.Encoded()
}

func descriptorOf(mediaType string, data []byte) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
}

func copyBlob(tw *tar.Writer, desc ocispec.Descriptor, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := tw.WriteHeader(&tar.Header{Name: blobPath(desc.Digest), Typeflag: tar.TypeReg, Mode: 0o644, Size: desc.Size, ModTime: Epoch}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// writeLayer writes l to w and returns the blob's descriptor and the
// layer's diff ID.
func writeLayer(w io.Writer, l Layer) (ocispec.Descriptor, digest.Digest, error) {
	blobHash := sha256.New()
	counter := &countingWriter{w: io.MultiWriter(w, blobHash)}
	// Uncompressed, the blob is the diff: one hash serves both.
	diffHash := blobHash
	var out io.Writer = counter
	var gz *gzip.Writer
	mediaType := ocispec.MediaTypeImageLayer
	if l.Gzip {
		diffHash = sha256.New()
		gz = gzip.NewWriter(counter)
		out = io.MultiWriter(gz, diffHash)
		mediaType = ocispec.MediaTypeImageLayerGzip
	}
	tw := tar.NewWriter(out)
	for _, e := range l.Entries {
		if err := writeEntry(tw, e); err != nil {
			return ocispec.Descriptor{}, "", fmt.Errorf("%s: %w", e.Path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return ocispec.Descriptor{}, "", err
		}
	}
	desc := ocispec.Descriptor{
		MediaType: mediaType,
		Digest:    digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(blobHash.Sum(nil))),
		Size:      counter.n,
	}
	return desc, digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(diffHash.Sum(nil))), nil
}

func writeEntry(tw *tar.Writer, e Entry) error {
	if e.Path == "" || strings.HasPrefix(e.Path, "/") || path.Clean(e.Path) != e.Path {
		return fmt.Errorf("path must be relative and clean")
	}
	h := &tar.Header{
		Name:     e.Path,
		Typeflag: e.Type,
		Mode:     e.Mode,
		Uid:      e.UID,
		Gid:      e.GID,
		ModTime:  Epoch,
		Linkname: e.Linkname,
		Format:   tar.FormatPAX,
	}
	if len(e.Xattrs) > 0 {
		h.PAXRecords = map[string]string{}
		for k, v := range e.Xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	var body io.Reader
	switch e.Type {
	case tar.TypeDir:
		h.Name += "/"
	case tar.TypeReg:
		h.Size = int64(len(e.Data))
		body = bytes.NewReader(e.Data)
		if e.Content != nil {
			h.Size = e.Size
			body = e.Content()
		}
	case tar.TypeSymlink, tar.TypeLink:
	default:
		return fmt.Errorf("unsupported type flag %q", e.Type)
	}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if body == nil {
		return nil
	}
	n, err := io.Copy(tw, body)
	if err == nil && n != h.Size {
		err = fmt.Errorf("content yielded %d bytes, want %d", n, h.Size)
	}
	return err
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Dir, File, Symlink, Hardlink and Whiteout build entries.

// Dir is a directory entry.
func Dir(p string, mode int64) Entry { return Entry{Path: p, Type: tar.TypeDir, Mode: mode} }

// File is a small regular file.
func File(p string, mode int64, data string) Entry {
	return Entry{Path: p, Type: tar.TypeReg, Mode: mode, Data: []byte(data)}
}

// Symlink is a symbolic link p pointing at target.
func Symlink(p, target string) Entry {
	return Entry{Path: p, Type: tar.TypeSymlink, Mode: 0o777, Linkname: target}
}

// Hardlink is a second name p for the file at target, earlier in the same layer.
func Hardlink(p, target string) Entry {
	return Entry{Path: p, Type: tar.TypeLink, Mode: 0o644, Linkname: target}
}

// Whiteout deletes p of a lower layer.
func Whiteout(p string) Entry {
	return Entry{Path: path.Join(path.Dir(p), ".wh."+path.Base(p)), Type: tar.TypeReg, Mode: 0o644}
}

// Opaque hides everything lower layers have in directory dir.
func Opaque(dir string) Entry {
	return Entry{Path: path.Join(dir, ".wh..wh..opq"), Type: tar.TypeReg, Mode: 0o644}
}

// Busybox returns the entries of a minimal userland from a static busybox
// binary: bin/busybox and one symlink per applet in bin, plus the
// directories and /etc files a container expects.
func Busybox(busyboxPath string) ([]Entry, error) {
	data, err := os.ReadFile(busyboxPath)
	if err != nil {
		return nil, err
	}
	if !isStatic(data) {
		return nil, fmt.Errorf("%s is not a static executable (install busybox-static)", busyboxPath)
	}
	out, err := exec.Command(busyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", busyboxPath, err)
	}
	entries := []Entry{Dir("bin", 0o755)}
	entries = append(entries, Entry{Path: "bin/busybox", Type: tar.TypeReg, Mode: 0o755, Data: data})
	for applet := range strings.FieldsSeq(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		entries = append(entries, Symlink("bin/"+applet, "busybox"))
	}
	entries = append(entries,
		Dir("etc", 0o755),
		File("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nthin:x:1000:1000:thin:/home/thin:/bin/sh\n"),
		File("etc/group", 0o644, "root:x:0:\nthin:x:1000:\n"),
		Dir("dev", 0o755), Dir("proc", 0o555), Dir("sys", 0o555),
		Dir("tmp", 0o1777), Dir("root", 0o700), Dir("run", 0o755),
	)
	return entries, nil
}

// isStatic reports whether an ELF file has no PT_INTERP program header
// (no dynamic loader): it then runs in an image with no libc.
func isStatic(elf []byte) bool {
	if len(elf) < 64 || string(elf[:4]) != "\x7fELF" || elf[4] != 2 || elf[5] != 1 {
		return false // not a little-endian 64-bit ELF
	}
	le := func(b []byte) uint64 {
		var v uint64
		for _, v0 := range slices.Backward(b) {
			v = v<<8 | uint64(v0)
		}
		return v
	}
	phoff, phentsize, phnum := le(elf[32:40]), le(elf[54:56]), le(elf[56:58])
	for i := range phnum {
		off := phoff + i*phentsize
		if off+4 > uint64(len(elf)) {
			return false
		}
		if le(elf[off:off+4]) == 3 { // PT_INTERP
			return false
		}
	}
	return true
}

// PseudoRandom yields n deterministic, incompressible bytes from seed
// (splitmix64): large file content that is cheap to make and to re-make.
func PseudoRandom(seed uint64, n int64) io.Reader {
	return io.LimitReader(&splitmix{state: seed, off: 8}, n)
}

type splitmix struct {
	state uint64
	buf   [8]byte
	off   int
}

func (s *splitmix) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if s.off == len(s.buf) {
			s.state += 0x9e3779b97f4a7c15
			z := s.state
			z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
			z = (z ^ z>>27) * 0x94d049bb133111eb
			z ^= z >> 31
			for i := range s.buf {
				s.buf[i] = byte(z >> (8 * i))
			}
			s.off = 0
		}
		c := copy(p[n:], s.buf[s.off:])
		s.off += c
		n += c
	}
	return n, nil
}
