package main

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// BenchmarkCallOverSocket is what one snapshots call costs us beyond the
// snapshotter's own work: Stat of one snapshot in-process and through our
// socket, as containerd's proxy calls it (and, through containerd, Walk:
// one such Stat per snapshot). The snapshotter is containerd's native one,
// so no kernel is needed; -test.cpu 1,2 shows what the machine's thread
// wakeups add.
func BenchmarkCallOverSocket(b *testing.B) {
	ctx := context.Background()
	sn, err := native.NewSnapshotter(filepath.Join(b.TempDir(), "native"))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		b.Fatal(err)
	}
	stat := func(b *testing.B, sn snapshots.Snapshotter) {
		for b.Loop() {
			if _, err := sn.Stat(ctx, "a"); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("in-process", func(b *testing.B) { stat(b, sn) })
	for _, tc := range []struct {
		name string
		m    *metrics
	}{
		{"socket", newMetrics()},
		{"socket without metrics", nil},
	} {
		b.Run(tc.name, func(b *testing.B) {
			sock := filepath.Join(b.TempDir(), "s")
			l, err := net.Listen("unix", sock)
			if err != nil {
				b.Fatal(err)
			}
			srv := newServer(sn, tc.m)
			go func() { _ = srv.Serve(l) }()
			defer srv.Stop()
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			stat(b, proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thin"))
		})
	}
}
