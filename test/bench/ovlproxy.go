package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"google.golang.org/grpc"

	"github.com/thin-snapshotter/thin-snapshotter/internal/daemontest"
)

// The proxy anchor: containerd's own overlayfs snapshotter served as a
// proxy plugin on a unix socket, as thin-snapshotter is, by this binary run
// again as `bench serve-overlayfs-proxy ROOT SOCKET`. Every call to a proxy
// plugin crosses a second gRPC hop (containerd to the plugin) that an
// in-process snapshotter does not: thin/overlayfs-proxy is thin's own cost,
// thin/overlayfs also includes that hop.
const (
	ovlProxy        = "overlayfs-proxy"
	serveOverlayArg = "serve-overlayfs-proxy"
)

// serveOverlayProxy serves overlayfs under root on sock until SIGTERM.
func serveOverlayProxy(root, sock string) error {
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return err
	}
	defer sn.Close()
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.GracefulStop()
	}()
	return srv.Serve(l)
}

// startOverlayProxy starts the proxy anchor on sock, its snapshots under
// root.
func (b *bench) startOverlayProxy(root, sock string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	b.ovlProxy, err = daemontest.Start(ovlProxy, filepath.Join(b.dir, ovlProxy+".log"), nil, self, serveOverlayArg, root, sock)
	if err != nil {
		return err
	}
	if err := b.ovlProxy.WaitSocket(sock, time.Minute); err != nil {
		return fmt.Errorf("%s: %w", ovlProxy, err)
	}
	return nil
}
