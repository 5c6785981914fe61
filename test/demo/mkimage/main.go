// Command mkimage writes the demo's image, an OCI image layout tarball for
// `ctr images import`: a busybox userland and a layer of demo files.
//
//	mkimage [-busybox /bin/busybox] [-ref docker.io/library/thin-demo:latest] -o image.tar
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/thin-snapshotter/thin-snapshotter/test/e2e/imagegen"
)

func main() {
	out := flag.String("o", "", "output tarball (required)")
	ref := flag.String("ref", "docker.io/library/thin-demo:latest", "image reference")
	busybox := flag.String("busybox", "/bin/busybox", "static busybox binary")
	flag.Parse()
	if *out == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*out, *ref, *busybox); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(out, ref, busybox string) error {
	userland, err := imagegen.Busybox(busybox)
	if err != nil {
		return err
	}
	img := imagegen.Image{
		Ref: ref,
		Layers: []imagegen.Layer{
			{Entries: userland, Gzip: true, Comment: "busybox userland"},
			{Entries: []imagegen.Entry{
				imagegen.Dir("etc", 0o755),
				imagegen.File("etc/motd", 0o644, "Welcome to a container on a device-mapper thin device.\n"),
				imagegen.Dir("demo", 0o755),
				imagegen.File("demo/README", 0o644, "Every layer of this image is a thin snapshot of the one below it.\n"),
			}, Gzip: true, Comment: "demo files"},
		},
	}
	img.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	img.Config.Cmd = []string{"/bin/sh"}

	f, err := os.Create(out)
	if err != nil {
		return err
	}
	res, err := imagegen.Write(f, filepath.Dir(out), img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out)
		return err
	}
	fmt.Printf("%s: %s, %d layers, manifest %s\n", out, ref, len(res.Layers), res.Manifest.Digest)
	return nil
}
