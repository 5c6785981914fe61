package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

const imageRef = "docker.io/thin-snapshotter/bench:latest"

type imageInfo struct {
	ref      string
	tar      string
	tarSize  int64
	chainIDs []string
}

// writeImage writes the bench image: a busybox userland, a layer of many
// small files, a large file, and a small top layer.
func writeImage(dir string, c *config) (imageInfo, error) {
	info := imageInfo{ref: imageRef, tar: filepath.Join(dir, "image.tar")}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return info, err
	}
	bb, err := imagegen.Busybox(c.busybox)
	if err != nil {
		return info, err
	}
	many := []imagegen.Entry{imagegen.Dir("many", 0o755)}
	const perDir = 100
	for i := range c.imageFiles {
		if i%perDir == 0 {
			many = append(many, imagegen.Dir(fmt.Sprintf("many/d%03d", i/perDir), 0o755))
		}
		many = append(many, imagegen.File(fmt.Sprintf("many/d%03d/f%05d", i/perDir, i), 0o644, fmt.Sprintf("file %d\n", i)))
	}
	bigSize := int64(c.imageBigMiB) << 20
	big := []imagegen.Entry{
		imagegen.Dir("big", 0o755),
		{Path: "big/blob", Type: '0', Mode: 0o644, Size: bigSize, Content: func() io.Reader {
			return imagegen.PseudoRandom(0x62656e63, bigSize)
		}},
	}
	top := []imagegen.Entry{imagegen.Dir("etc", 0o755), imagegen.File("etc/motd", 0o644, "bench\n")}
	img := imagegen.Image{
		Ref: imageRef,
		Layers: []imagegen.Layer{
			{Entries: bb, Gzip: true, Comment: "busybox"},
			{Entries: many, Gzip: true, Comment: "small files"},
			{Entries: big, Comment: "large file"},
			{Entries: top, Gzip: true, Comment: "top"},
		},
	}
	img.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	img.Config.Cmd = []string{"/bin/true"}
	f, err := os.Create(info.tar)
	if err != nil {
		return info, err
	}
	res, err := imagegen.Write(f, dir, img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return info, err
	}
	for _, c := range res.ChainIDs {
		info.chainIDs = append(info.chainIDs, c.String())
	}
	st, err := os.Stat(info.tar)
	if err != nil {
		return info, err
	}
	info.tarSize = st.Size()
	return info, nil
}
