//go:build linux

package dmsetup

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func requireLoop(t *testing.T) {
	t.Helper()
	requireRoot(t)
	if _, err := os.Stat(loopControl); err != nil {
		if os.Getenv(requireDMEnv) == "1" {
			t.Fatalf("%s missing: %v", loopControl, err)
		}
		t.Skipf("no loop devices: %v", err)
	}
}

func loopSysfs(dev, attr string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", attr))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// waitLoopDetached polls because autoclear runs on the last close.
func waitLoopDetached(t *testing.T, dev string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for loopSysfs(dev, "backing_file") != "" {
		if time.Now().After(deadline) {
			t.Fatalf("%s still attached to %s", dev, loopSysfs(dev, "backing_file"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAttachLoopAutoclear(t *testing.T) {
	requireLoop(t)
	file := filepath.Join(t.TempDir(), "backing")
	if err := createSparse(file, 8<<20, false); err != nil {
		t.Fatal(err)
	}
	l, err := attachLoop(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := loopSysfs(l.path, "backing_file"); got != file {
		l.close()
		t.Fatalf("backing_file %q, want %q", got, file)
	}
	if got := loopSysfs(l.path, "autoclear"); got != "1" {
		t.Errorf("autoclear %q", got)
	}
	if l.major != 7 || !strings.HasSuffix(l.path, "loop"+strconv.FormatUint(uint64(l.minor), 10)) {
		t.Errorf("device %s is %s", l.path, l.devArg())
	}
	l.close()
	waitLoopDetached(t, l.path)
}

func TestPrepareFiles(t *testing.T) {
	dir := t.TempDir()
	p := &LoopPool{Name: "p", DataFile: filepath.Join(dir, LoopDataFile), MetadataFile: filepath.Join(dir, LoopMetadataFile)}
	cfg := LoopPoolConfig{DataSize: 256 << 20, MetadataSize: 16 << 20}

	for _, bad := range []LoopPoolConfig{{}, {MetadataSize: 16 << 20}, {DataSize: 256 << 20}} {
		if err := p.prepareFiles(bad); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("%+v: %v, want InvalidArgument", bad, err)
		}
		if _, err := os.Stat(p.DataFile); !os.IsNotExist(err) {
			t.Fatalf("%+v: data file created: %v", bad, err)
		}
	}
	if err := p.prepareFiles(cfg); err != nil {
		t.Fatal(err)
	}
	for f, size := range map[string]uint64{p.DataFile: 256 << 20, p.MetadataFile: 16 << 20} {
		if got, _ := fileSize(f); got != size {
			t.Errorf("%s: size %d want %d", f, got, size)
		}
	}
	// Simulate metadata written by the kernel; a reopen must keep it.
	written := bytes.Repeat([]byte{0xa5}, metaHeaderSize)
	f, err := os.OpenFile(p.MetadataFile, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(written, 0)
	f.Close()
	if err := p.prepareFiles(cfg); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, metaHeaderSize)
	f, _ = os.Open(p.MetadataFile)
	f.ReadAt(head, 0)
	f.Close()
	if !bytes.Equal(head, written) {
		t.Error("existing metadata header was modified")
	}
	// Metadata without its data is refused.
	os.Remove(p.DataFile)
	if err := p.prepareFiles(cfg); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("metadata without data: %v", err)
	}
	// Data without metadata: fresh, zeroed metadata of MetadataSize, which
	// is then required.
	os.Remove(p.MetadataFile)
	if err := createSparse(p.DataFile, 1<<30, false); err != nil {
		t.Fatal(err)
	}
	if err := p.prepareFiles(LoopPoolConfig{DataSize: 1 << 30}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("no MetadataSize: %v", err)
	}
	if err := p.prepareFiles(LoopPoolConfig{MetadataSize: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	if got, _ := fileSize(p.MetadataFile); got != 32<<20 {
		t.Errorf("metadata size %d, want %d", got, 32<<20)
	}
	f, _ = os.Open(p.MetadataFile)
	f.ReadAt(head, 0)
	f.Close()
	if !bytes.Equal(head, make([]byte, metaHeaderSize)) {
		t.Error("new metadata header not zero")
	}
}
