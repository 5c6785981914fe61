package main

import (
	"context"
	"errors"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/thin-snapshotter/thin-snapshotter/proto/thin/admin/v1"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// adminBackend is what the admin API and the pool metrics need of the
// snapshotter; *snapshotter.Snapshotter implements it. A snapshotter that
// does not (the tests' doubles) is served without them.
type adminBackend interface {
	Status(ctx context.Context) (snapshotter.Status, error)
	Devices(ctx context.Context) ([]snapshotter.Device, error)
	CheckOnline(ctx context.Context) (*snapshotter.Report, error)
	Drain(ctx context.Context) error
	SetStepObserver(o snapshotter.StepObserver)
}

var _ adminBackend = (*snapshotter.Snapshotter)(nil)

// adminServer serves thin.admin.v1.Admin from the snapshotter's plain Go
// methods. Errors keep their errdefs kinds: the server's interceptor turns
// them into gRPC codes.
type adminServer struct {
	adminv1.UnimplementedAdminServer
	sn adminBackend
}

func (a *adminServer) Status(ctx context.Context, _ *adminv1.StatusRequest) (*adminv1.StatusResponse, error) {
	st, err := a.sn.Status(ctx)
	if err != nil {
		return nil, err
	}
	return statusToProto(st), nil
}

// statusToProto is the admin API's StatusResponse for st, with this
// binary's version.
func statusToProto(st snapshotter.Status) *adminv1.StatusResponse {
	v, c := buildVersion()
	r := st.LastRecovery
	out := &adminv1.StatusResponse{
		Version:           v,
		Commit:            c,
		Pool:              st.Pool,
		Mode:              st.Mode,
		NeedsCheck:        st.NeedsCheck,
		WhenFull:          st.WhenFull,
		PoolTransactionId: st.PoolTransactionID,
		DbTransactionId:   st.DBTransactionID,
		Data: &adminv1.Space{
			UsedBytes: st.DataUsed, TotalBytes: st.DataTotal, BlockSizeBytes: st.DataBlockSize,
			LowWaterMarkBytes: st.DataLowWaterMark, LowWater: st.DataLowWater,
		},
		Metadata: &adminv1.Space{
			UsedBytes: st.MetadataUsed, TotalBytes: st.MetadataTotal, BlockSizeBytes: snapshotter.MetadataBlockSize,
			LowWaterMarkBytes: st.MetadataLowWaterMark, LowWater: st.MetadataLowWater,
		},
		Snapshots:       map[string]uint32{},
		NotReady:        uint32(st.NotReady),
		ActiveDevices:   uint32(st.ActiveDevices),
		PendingJournal:  uint32(st.PendingJournal),
		PendingRemovals: uint32(st.PendingRemovals),
		WarmDevices:     uint32(st.WarmDevices),
		LastRecovery: &adminv1.Recovery{
			RolledBackCreates:  uint32(r.RolledBackCreates),
			FinishedRemovals:   uint32(r.FinishedRemovals),
			DeferredRemovals:   uint32(r.DeferredRemovals),
			DroppedOperations:  uint32(r.DroppedOperations),
			ReactivatedDevices: uint32(r.ReactivatedDevices),
			FinishedCommits:    uint32(r.FinishedCommits),
			Duration:           durationpb.New(r.Duration),
		},
		Thresholds: &adminv1.Thresholds{
			MinFreeDataPercent:     st.MinFreeData,
			MinFreeMetadataPercent: st.MinFreeMetadata,
			AsyncRemove:            st.AsyncRemove,
		},
		SelfCheck: selfCheckToProto(st.CheckInterval, st.LastCheck),
		ImageFs: &adminv1.ImageFS{
			Dir: st.ImageFS.Dir, Mirrored: st.ImageFS.Mirrored, Device: st.ImageFS.Device,
			Major: st.ImageFS.Major, Minor: st.ImageFS.Minor,
			CapacityBytes: st.ImageFS.Capacity, AvailableBytes: st.ImageFS.Available,
			Inodes: st.ImageFS.Inodes, InodesFree: st.ImageFS.InodesFree,
			Error: st.ImageFS.Error,
		},
	}
	// Every kind gets a key, even with no snapshots of it, so that a client
	// sees a zero rather than a missing key.
	for _, k := range snapshotter.Kinds {
		out.Snapshots[k] = uint32(st.Snapshots[k])
	}
	return out
}

// selfCheckToProto is the admin API's SelfCheck for the interval and the
// last run.
func selfCheckToProto(interval time.Duration, c snapshotter.CheckRun) *adminv1.SelfCheck {
	out := &adminv1.SelfCheck{
		Interval: durationpb.New(interval),
		Trigger:  c.Trigger,
		Duration: durationpb.New(c.Duration),
		Error:    c.Error,
		Findings: findingsToProto(c.Findings),
	}
	if !c.Ended.IsZero() {
		out.Ended = timestamppb.New(c.Ended)
	}
	return out
}

// findingsToProto is the admin API's form of fs.
func findingsToProto(fs []snapshotter.Finding) []*adminv1.Finding {
	out := make([]*adminv1.Finding, 0, len(fs))
	for _, f := range fs {
		out = append(out, &adminv1.Finding{
			Kind: string(f.Kind), DeviceId: f.DeviceID, Device: f.Device, Key: f.Key,
			Message: f.Message, Repairable: f.Repairable, Action: f.Action, Repaired: f.Repaired, Error: f.Error,
		})
	}
	return out
}

func (a *adminServer) ListDevices(ctx context.Context, _ *adminv1.ListDevicesRequest) (*adminv1.ListDevicesResponse, error) {
	devs, err := a.sn.Devices(ctx)
	if err != nil {
		return nil, err
	}
	out := &adminv1.ListDevicesResponse{Devices: make([]*adminv1.Device, 0, len(devs))}
	for _, d := range devs {
		out.Devices = append(out.Devices, &adminv1.Device{
			Id: d.ID, Name: d.Name, Key: d.Key, Kind: d.Kind, State: d.State,
			Active: d.Active, OpenCount: d.OpenCount, ReadOnly: d.ReadOnly,
			MappedBytes: d.MappedBytes, VirtualSizeBytes: d.VirtualSize,
		})
	}
	return out, nil
}

func (a *adminServer) Check(ctx context.Context, _ *adminv1.CheckRequest) (*adminv1.CheckResponse, error) {
	r, err := a.sn.CheckOnline(ctx)
	if err != nil {
		return nil, err
	}
	out := &adminv1.CheckResponse{
		Root: r.Root, Pool: r.Pool,
		PoolTransactionId: r.PoolTransactionID, DbTransactionId: r.DBTransactionID,
		BaseDeviceId: r.BaseDeviceID, PoolDevices: r.PoolDevices, Records: uint32(r.Records),
		Findings: findingsToProto(r.Findings), Clean: r.Clean,
	}
	return out, nil
}

// reportFromProto turns the daemon's answer to an online check back into a
// snapshotter.Report, so that the check command prints it the same way as
// the report of an offline check.
func reportFromProto(p *adminv1.CheckResponse) *snapshotter.Report {
	r := &snapshotter.Report{
		Root: p.GetRoot(), Pool: p.GetPool(),
		PoolTransactionID: p.GetPoolTransactionId(), DBTransactionID: p.GetDbTransactionId(),
		BaseDeviceID: p.GetBaseDeviceId(), PoolDevices: p.GetPoolDevices(), Records: int(p.GetRecords()),
		Findings: []snapshotter.Finding{}, Clean: p.GetClean(), Online: true,
	}
	if r.PoolDevices == nil {
		r.PoolDevices = []uint32{}
	}
	for _, f := range p.GetFindings() {
		r.Findings = append(r.Findings, snapshotter.Finding{
			Kind: snapshotter.FindingKind(f.GetKind()), DeviceID: f.GetDeviceId(), Device: f.GetDevice(),
			Key: f.GetKey(), Message: f.GetMessage(), Repairable: f.GetRepairable(),
		})
	}
	r.Remaining = r.Findings
	return r
}

func (a *adminServer) Cleanup(ctx context.Context, _ *adminv1.CleanupRequest) (*adminv1.CleanupResponse, error) {
	before, err := a.sn.Status(ctx)
	if err != nil {
		return nil, err
	}
	cerr := a.sn.Drain(ctx)
	if cerr != nil && ctx.Err() != nil {
		return nil, errors.Join(cerr, ctx.Err())
	}
	after, err := a.sn.Status(ctx)
	if err != nil {
		return nil, err
	}
	out := &adminv1.CleanupResponse{
		PendingBefore: uint32(before.PendingRemovals),
		PendingAfter:  uint32(after.PendingRemovals),
	}
	switch {
	case cerr != nil:
		// Removals of busy devices stay pending; PendingAfter says how
		// many are left.
		out.Error = cerr.Error()
	case out.PendingAfter > 0:
		// Drain succeeded, yet removals are pending: the background worker
		// took some of them while Drain ran, or new ones were queued.
		out.Error = "still pending: being removed in the background or new; run cleanup again"
	}
	return out, nil
}
