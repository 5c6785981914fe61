package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

const (
	imageRef = "docker.io/thin-snapshotter/e2e:latest"
	bigSize  = 64 << 20
	bigSeed  = 0x7468696e
	// many/dNN/fNNNN: manyDirs directories of manyPerDir files each.
	manyDirs   = 30
	manyPerDir = 100
)

// e2eImage is the test image; expect is what a container of it must print
// for the checks in containerScript.
func e2eImage(t *testing.T, busybox string) (imagegen.Image, map[string]string) {
	bb, err := imagegen.Busybox(busybox)
	if err != nil {
		t.Fatal(err)
	}
	// Layer 1: a userland, thousands of small files, and what later layers
	// delete, hide or overwrite.
	l1 := append([]imagegen.Entry(nil), bb...)
	l1 = append(l1, imagegen.Dir("many", 0o755))
	for d := range manyDirs {
		dir := fmt.Sprintf("many/d%02d", d)
		l1 = append(l1, imagegen.Dir(dir, 0o755))
		for f := range manyPerDir {
			n := d*manyPerDir + f
			l1 = append(l1, imagegen.File(fmt.Sprintf("%s/f%04d", dir, n), 0o644, fmt.Sprintf("file %d\n", n)))
		}
	}
	l1 = append(l1,
		imagegen.Dir("data", 0o755),
		imagegen.File("data/deleted", 0o644, "deleted in layer 3\n"),
		imagegen.File("data/keep", 0o644, "old\n"),
		imagegen.Dir("opq", 0o755),
		imagegen.File("opq/old1", 0o644, "old1\n"),
		imagegen.File("opq/old2", 0o644, "old2\n"),
		imagegen.Dir("opq/sub", 0o755),
		imagegen.File("opq/sub/old3", 0o644, "old3\n"),
		imagegen.Dir("wh", 0o755),
		imagegen.Dir("wh/gone", 0o755),
		imagegen.File("wh/gone/a", 0o644, "a\n"),
		imagegen.File("wh/gone/b", 0o644, "b\n"),
		imagegen.File("wh/stay", 0o644, "stay\n"),
	)

	// Layer 2: one large file, uncompressed.
	l2 := []imagegen.Entry{
		imagegen.Dir("big", 0o755),
		{Path: "big/blob", Type: '0', Mode: 0o644, Size: bigSize, Content: func() io.Reader {
			return imagegen.PseudoRandom(bigSeed, bigSize)
		}},
	}
	h := sha256.New()
	if _, err := io.Copy(h, imagegen.PseudoRandom(bigSeed, bigSize)); err != nil {
		t.Fatal(err)
	}
	// Computed apart from the layer so that a generator bug cannot make
	// image and expectation agree.
	bigSum := hex.EncodeToString(h.Sum(nil))

	// Layer 3: whiteouts, an opaque directory, links, xattrs, ownership.
	l3 := []imagegen.Entry{
		imagegen.Dir("data", 0o755),
		imagegen.Whiteout("data/deleted"),
		imagegen.Dir("wh", 0o755),
		imagegen.Whiteout("wh/gone"),
		imagegen.Dir("opq", 0o755),
		imagegen.Opaque("opq"),
		imagegen.File("opq/new1", 0o644, "new1\n"),
		imagegen.Dir("opq/newdir", 0o755),
		imagegen.File("opq/newdir/x", 0o644, "x\n"),
		imagegen.Dir("links", 0o755),
		imagegen.File("links/a", 0o644, "linked\n"),
		imagegen.Hardlink("links/b", "links/a"),
		imagegen.Symlink("links/sym", "../data/keep"),
		imagegen.Symlink("links/abs", "/data/keep"),
		imagegen.Dir("xattr", 0o755),
		{Path: "xattr/file", Type: '0', Mode: 0o644, Data: []byte("has xattrs\n"),
			Xattrs: map[string]string{"user.thin": "e2e-value", "user.other": "42"}},
		{Path: "perm", Type: '5', Mode: 0o755},
		{Path: "perm/file", Type: '0', Mode: 0o640, UID: 1000, GID: 1000, Data: []byte("secret\n")},
		{Path: "perm/dir", Type: '5', Mode: 0o700, UID: 1000, GID: 1000},
	}

	// Layer 4: an overwritten file, a deleted file, a new file.
	l4 := []imagegen.Entry{
		imagegen.Dir("data", 0o755),
		imagegen.File("data/keep", 0o644, "new\n"),
		imagegen.Dir("many", 0o755),
		imagegen.Dir("many/d00", 0o755),
		imagegen.Whiteout("many/d00/f0000"),
		imagegen.File("etc/motd", 0o644, "hello from a thin device\n"),
	}

	img := imagegen.Image{
		Ref: imageRef,
		Layers: []imagegen.Layer{
			{Entries: l1, Gzip: true, Comment: "userland and small files"},
			{Entries: l2, Comment: "large file"},
			{Entries: l3, Gzip: true, Comment: "whiteouts, opaque directory, links, xattrs"},
			{Entries: l4, Gzip: true, Comment: "overwrite and delete"},
		},
	}
	img.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	img.Config.Cmd = []string{"/bin/sh"}

	last := manyDirs*manyPerDir - 1
	expect := map[string]string{
		"deleted":           "absent",
		"wh_gone":           "absent",
		"wh_stay":           "stay",
		"opq":               "new1 newdir",
		"opq_sub":           "absent",
		"opq_newdir":        "x",
		"many":              fmt.Sprint(manyDirs*manyPerDir - 1),
		"many_dirs":         fmt.Sprint(manyDirs),
		"many_first":        "absent",
		"many_last":         fmt.Sprintf("file %d", last),
		"big":               bigSum,
		"big_size":          fmt.Sprint(bigSize),
		"hardlink":          "same",
		"nlink":             "2",
		"symlink":           "../data/keep",
		"symlink_content":   "new",
		"abslink_content":   "new",
		"keep":              "new",
		"motd":              "hello from a thin device",
		"perm_file":         "640 1000 1000",
		"perm_dir":          "700 1000 1000",
		"whiteouts_visible": "0",
		"lost_found":        "absent",
		"write":             "written by the container",
		"scratch":           fmt.Sprint(16 << 20),
		"scratch_sum":       zeroSum(16 << 20),
		"done":              "1",
	}
	return img, expect
}

func zeroSum(n int) string {
	s := sha256.Sum256(make([]byte, n))
	return hex.EncodeToString(s[:])
}

// containerScript prints key=value lines that e2eImage's expectations
// describe, plus root= (the root mount) checked separately.
const containerScript = `
ex() { if test -e "$1" || test -L "$1"; then echo present; else echo absent; fi; }
echo "deleted=$(ex /data/deleted)"
echo "wh_gone=$(ex /wh/gone)"
echo "wh_stay=$(cat /wh/stay)"
echo "opq=$(echo $(ls -A /opq))"
echo "opq_sub=$(ex /opq/sub)"
echo "opq_newdir=$(cat /opq/newdir/x)"
echo "many=$(find /many -type f | wc -l)"
echo "many_dirs=$(find /many -mindepth 1 -type d | wc -l)"
echo "many_first=$(ex /many/d00/f0000)"
echo "many_last=$(cat /many/d29/f2999)"
echo "big=$(sha256sum /big/blob | cut -d' ' -f1)"
echo "big_size=$(stat -c %s /big/blob)"
if [ "$(stat -c %i /links/a)" = "$(stat -c %i /links/b)" ]; then echo hardlink=same; else echo hardlink=different; fi
echo "nlink=$(stat -c %h /links/a)"
echo "symlink=$(readlink /links/sym)"
echo "symlink_content=$(cat /links/sym)"
echo "abslink_content=$(cat /links/abs)"
echo "keep=$(cat /data/keep)"
echo "motd=$(cat /etc/motd)"
echo "perm_file=$(stat -c '%a %u %g' /perm/file)"
echo "perm_dir=$(stat -c '%a %u %g' /perm/dir)"
echo "whiteouts_visible=$(find / -xdev -name '.wh.*' | wc -l)"
echo "lost_found=$(ex /lost+found)"
echo "root=$(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"
echo "written by the container" > /written
echo "write=$(cat /written)"
dd if=/dev/zero of=/scratch bs=1M count=16 2>/dev/null
sync
echo "scratch=$(stat -c %s /scratch)"
echo "scratch_sum=$(sha256sum /scratch | cut -d' ' -f1)"
echo "df=$(df -k / | tail -n 1)"
echo done=1
`

func parseKV(out string) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}
