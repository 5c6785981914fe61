package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/urfave/cli/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	adminv1 "github.com/thin-snapshotter/thin-snapshotter/proto/thin/admin/v1"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// adminCallTimeout bounds one admin call; an online check reads the pool's
// metadata with thin_ls, which takes seconds on a large pool.
const adminCallTimeout = 5 * time.Minute

// errNoDaemon is the one-line error of a client command when nothing serves
// the address.
var errNoDaemon = errors.New("no thin-snapshotter daemon")

// dialAdmin connects to the daemon's admin API on the unix socket address.
// A missing socket or one nobody listens on is errNoDaemon with the reason.
func dialAdmin(address string) (adminv1.AdminClient, func(), error) {
	c, err := net.DialTimeout("unix", address, dialTimeout)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, nil, fmt.Errorf("%w at %s (no socket; is it running, with this --address or config?)", errNoDaemon, address)
	case errors.Is(err, syscall.ECONNREFUSED):
		return nil, nil, fmt.Errorf("%w at %s (connection refused: a stale socket)", errNoDaemon, address)
	case errors.Is(err, os.ErrPermission):
		return nil, nil, fmt.Errorf("daemon at %s: permission denied (the socket is mode 0660: run as root or in its group)", address)
	case err != nil:
		return nil, nil, fmt.Errorf("daemon at %s: %w", address, err)
	}
	c.Close()
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("daemon at %s: %w", address, err)
	}
	return adminv1.NewAdminClient(conn), func() { conn.Close() }, nil
}

// callAdmin dials the daemon of cmd's configuration and runs call with a
// bounded context; errors come back with their errdefs kinds.
func callAdmin(ctx context.Context, cmd *cli.Command, call func(context.Context, adminv1.AdminClient) error) error {
	address, err := clientAddress(cmd)
	if err != nil {
		return err
	}
	client, closeConn, err := dialAdmin(address)
	if err != nil {
		return err
	}
	defer closeConn()
	ctx, cancel := context.WithTimeout(ctx, adminCallTimeout)
	defer cancel()
	err = call(ctx, client)
	switch {
	case err == nil:
		return nil
	case status.Code(err) == codes.Unimplemented:
		return fmt.Errorf("the daemon at %s does not serve the admin API (an older thin-snapshotter?): %w", address, errgrpc.ToNative(err))
	case status.Code(err) == codes.Unavailable:
		return fmt.Errorf("%w at %s: %w", errNoDaemon, address, errgrpc.ToNative(err))
	}
	return errgrpc.ToNative(err)
}

// clientAddress is the socket a client command talks to: --address, else the
// configuration file's, else the default.
func clientAddress(cmd *cli.Command) (string, error) {
	cfg, err := resolveConfig(cmd)
	if err != nil {
		return "", err
	}
	return cfg.Address, nil
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the running daemon's pool and bookkeeping",
		Description: "Asks the daemon serving --address (or the configuration's address). Sizes are\n" +
			"binary (KiB, MiB, ...). --json prints the admin API's StatusResponse in protobuf's\n" +
			"JSON mapping (field names as in proto/thin/admin/v1/admin.proto; 64-bit numbers\n" +
			"are strings).",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			return callAdmin(ctx, cmd, func(ctx context.Context, c adminv1.AdminClient) error {
				st, err := c.Status(ctx, &adminv1.StatusRequest{})
				if err != nil {
					return err
				}
				if cmd.Bool("json") {
					return printProtoJSON(cmd.Root().Writer, st)
				}
				printStatus(cmd.Root().Writer, st)
				return nil
			})
		},
	}
}

func devicesCommand() *cli.Command {
	return &cli.Command{
		Name:  "devices",
		Usage: "list the thin devices of the running daemon",
		Description: "One line per thin id: the base, every snapshot and every pending removal, with\n" +
			"its dm device. OPEN, MAPPED are only known for active devices (\"-\" otherwise);\n" +
			"SIZE is the virtual size.",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			return callAdmin(ctx, cmd, func(ctx context.Context, c adminv1.AdminClient) error {
				resp, err := c.ListDevices(ctx, &adminv1.ListDevicesRequest{})
				if err != nil {
					return err
				}
				if cmd.Bool("json") {
					return printProtoJSON(cmd.Root().Writer, resp)
				}
				printDevices(cmd.Root().Writer, resp.GetDevices())
				return nil
			})
		},
	}
}

func cleanupCommand() *cli.Command {
	return &cli.Command{
		Name:  "cleanup",
		Usage: "make the running daemon delete its warm devices and finish pending removals now",
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			return callAdmin(ctx, cmd, func(ctx context.Context, c adminv1.AdminClient) error {
				resp, err := c.Cleanup(ctx, &adminv1.CleanupRequest{})
				if err != nil {
					return err
				}
				w := cmd.Root().Writer
				fmt.Fprintf(w, "pending removals: %d before, %d after\n", resp.GetPendingBefore(), resp.GetPendingAfter())
				if resp.GetError() != "" {
					return fmt.Errorf("%d removals left pending: %s", resp.GetPendingAfter(), resp.GetError())
				}
				return nil
			})
		},
	}
}

// runOnlineCheck asks the daemon for a read-only check and prints it as the
// offline check does; it returns the check's exit status.
func runOnlineCheck(ctx context.Context, cmd *cli.Command, asJSON bool, w io.Writer) (int, error) {
	var r *snapshotter.Report
	if err := callAdmin(ctx, cmd, func(ctx context.Context, c adminv1.AdminClient) error {
		resp, err := c.Check(ctx, &adminv1.CheckRequest{})
		if err != nil {
			return err
		}
		r = reportFromProto(resp)
		return nil
	}); err != nil {
		return checkError, err
	}
	if err := printCheckReport(w, r, asJSON); err != nil {
		return checkError, err
	}
	if !r.Clean {
		return checkProblems, nil
	}
	return checkClean, nil
}

// printProtoJSON prints m in protobuf's JSON mapping, zero fields included,
// indented the same way every time (protojson varies its whitespace).
func printProtoJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true, UseProtoNames: true}.Marshal(m)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		return err
	}
	buf.WriteByte('\n')
	_, err = buf.WriteTo(w)
	return err
}

func printStatus(w io.Writer, st *adminv1.StatusResponse) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(name, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{name}, args...)...)
	}
	row("daemon", "%s (commit %s)", st.GetVersion(), st.GetCommit())
	row("pool", "%s", st.GetPool())
	row("mode", "%s", st.GetMode())
	row("when full", "%s", whenFull(st.GetWhenFull()))
	row("data", "%s", space(st.GetData()))
	row("metadata", "%s", space(st.GetMetadata()))
	row("transaction id", "pool %d, database %d", st.GetPoolTransactionId(), st.GetDbTransactionId())
	var kinds []string
	for _, k := range snapshotter.Kinds {
		kinds = append(kinds, fmt.Sprintf("%d %s", st.GetSnapshots()[k], k))
	}
	row("snapshots", "%s; %d not ready", strings.Join(kinds, ", "), st.GetNotReady())
	row("dm devices", "%d active, %d of them warm", st.GetActiveDevices(), st.GetWarmDevices())
	row("journal", "%d pending entries, %d pending removals", st.GetPendingJournal(), st.GetPendingRemovals())
	r := st.GetLastRecovery()
	row("last start", "recovery took %s: %d creates rolled back, %d removals finished, %d deferred (busy), %d commits dropped, %d commits finished, %d devices reactivated",
		r.GetDuration().AsDuration().Round(time.Microsecond), r.GetRolledBackCreates(), r.GetFinishedRemovals(),
		r.GetDeferredRemovals(), r.GetDroppedOperations(), r.GetFinishedCommits(), r.GetReactivatedDevices())
	th := st.GetThresholds()
	row("thresholds", "new devices refused below %s free data, %s free metadata; async_remove %v",
		percentOrOff(th.GetMinFreeDataPercent()), percentOrOff(th.GetMinFreeMetadataPercent()), th.GetAsyncRemove())
	printSelfCheck(row, st.GetSelfCheck())
	row("imagefs", "%s", imageFS(st.GetImageFs()))
	tw.Flush()
}

// imageFS describes in a line of status what the kubelet sees of the image
// filesystem.
func imageFS(f *adminv1.ImageFS) string {
	out := fmt.Sprintf("the kubelet sees %s, %s available, at %s (device %d:%d", humanBytes(f.GetCapacityBytes()),
		humanBytes(f.GetAvailableBytes()), f.GetDir(), f.GetMajor(), f.GetMinor())
	switch {
	case f.GetMirrored():
		out += ", the pool's mirror on " + f.GetDevice() + ")"
	case f.GetError() == "":
		out += "): not the pool's, the mirror is off"
	default:
		out += "): not the pool's"
	}
	if f.GetError() != "" {
		out += "; MIRROR FAILED: " + f.GetError()
	}
	return out
}

// whenFull says in a line of status what writes to a full pool do.
func whenFull(policy string) string {
	switch policy {
	case snapshotter.WhenFullQueue:
		return "writes wait (the pool grows itself)"
	case snapshotter.WhenFullError:
		return "writes fail at once"
	}
	return policy
}

// maxFindingLines bounds the findings status lists; check --online lists
// them all.
const maxFindingLines = 10

// printSelfCheck prints the self-check's rows of status: the last run,
// then one line per finding, what was repaired and what is left.
func printSelfCheck(row func(name, format string, args ...any), sc *adminv1.SelfCheck) {
	every := "off (check_interval = 0)"
	if d := sc.GetInterval().AsDuration(); d > 0 {
		every = "every " + config.Duration(d).String()
	}
	if sc.GetEnded() == nil {
		row("self-check", "%s; none yet", every)
		return
	}
	last := fmt.Sprintf("%s; last after %s, ended %s, took %s", every, sc.GetTrigger(),
		sc.GetEnded().AsTime().UTC().Format(time.RFC3339), sc.GetDuration().AsDuration().Round(time.Millisecond))
	fs := sc.GetFindings()
	left := 0
	for _, f := range fs {
		if !f.GetRepaired() {
			left++
		}
	}
	switch {
	case sc.GetError() != "":
		row("self-check", "%s: could not check: %s", last, sc.GetError())
		return
	case len(fs) == 0:
		row("self-check", "%s: consistent", last)
		return
	}
	row("self-check", "%s: %s, %d repaired online, %d left", last, problems(len(fs)), len(fs)-left, left)
	for i, f := range fs {
		if i == maxFindingLines {
			row("", "... %d more: thin-snapshotter check --online lists them", len(fs)-i)
			break
		}
		switch {
		case f.GetRepaired():
			row("", "repaired %s: %s", f.GetKind(), f.GetAction())
		case f.GetError() != "":
			row("", "left %s: %s (%s failed: %s)", f.GetKind(), f.GetMessage(), f.GetAction(), f.GetError())
		case f.GetAction() != "":
			row("", "left %s: %s; %s", f.GetKind(), f.GetMessage(), f.GetAction())
		default:
			row("", "left %s: %s", f.GetKind(), f.GetMessage())
		}
	}
}

// space describes one of the pool's two spaces in a line of status.
func space(s *adminv1.Space) string {
	out := fmt.Sprintf("%s of %s used (%.1f%%), %s free", humanBytes(s.GetUsedBytes()), humanBytes(s.GetTotalBytes()),
		percent(s.GetUsedBytes(), s.GetTotalBytes()), humanBytes(s.GetTotalBytes()-min(s.GetUsedBytes(), s.GetTotalBytes())))
	if s.GetLowWaterMarkBytes() > 0 {
		out += "; low-water mark " + humanBytes(s.GetLowWaterMarkBytes())
	}
	if s.GetLowWater() {
		out += "; LOW-WATER MARK CROSSED"
	}
	return out
}

func percent(used, total uint64) float64 {
	if total == 0 {
		return 0
	}
	return 100 * float64(used) / float64(total)
}

func percentOrOff(p float64) string {
	if p <= 0 {
		return "off"
	}
	return fmt.Sprintf("%g%%", p)
}

// humanBytes formats n in the largest binary unit in which it is at least
// 1, with one decimal (e.g. "1.5 GiB").
func humanBytes(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/1024, 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, units[i])
}

func printDevices(w io.Writer, devs []*adminv1.Device) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKIND\tSTATE\tACTIVE\tOPEN\tMAPPED\tSIZE\tDEVICE\tKEY")
	for _, d := range devs {
		active, open, mapped := "no", "-", "-"
		if d.GetActive() {
			active, open, mapped = "yes", fmt.Sprint(d.GetOpenCount()), humanBytes(d.GetMappedBytes())
			if d.GetReadOnly() {
				active = "ro"
			}
		}
		size := "-"
		if d.GetVirtualSizeBytes() > 0 {
			size = humanBytes(d.GetVirtualSizeBytes())
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.GetId(), orDefault(d.GetKind(), "-"), d.GetState(),
			active, open, mapped, size, d.GetName(), orDefault(d.GetKey(), "-"))
	}
	tw.Flush()
}
