package config

import (
	"fmt"
	"io"
	"strings"
	"text/template"

	"github.com/pelletier/go-toml/v2"

	"github.com/thin-snapshotter/thin-snapshotter/internal/podsize"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// fileTemplate is the commented configuration file; every value comes from
// the Config it is rendered with, so the defaults are stated only in Default.
const fileTemplate = `# thin-snapshotter configuration
#
# The complete default configuration, as printed by
# "thin-snapshotter config default". Every key is optional: a key left out
# keeps the value shown here. Unknown keys are an error. The command line
# flags --root, --address and --log-level override the keys of the same name.
#
# Sizes are a whole number of bytes (1048576 or "1048576") or a whole number
# with a unit: "64KiB", "10GiB", "1TiB" (binary; "64K", "10G", "1T" mean the
# same) or "500MB", "10GB" (decimal, powers of 1000). No fractions: write
# "1536MiB", not "1.5GiB". A size of 0 means its default.

# Directory for the snapshot database and the embedded pool's files, created
# with mode 0700. One daemon per root: a second daemon on the same root
# refuses to start.
root = {{ value .Root }}

# Unix socket serving containerd's snapshots API; containerd's
# [proxy_plugins.<name>] address must name it. A missing directory is created
# with mode 0700; the socket gets mode 0660.
address = {{ value .Address }}

# One of {{ .LogLevels }}.
log_level = {{ value .LogLevel }}

# host:port of a Prometheus endpoint serving /metrics (gRPC calls by method
# and code, their latency, Go runtime). Empty: no endpoint.
metrics_address = {{ value .MetricsAddress }}

# How often the daemon checks its database against the pool while it serves,
# as "thin-snapshotter check --online" does, and repairs what is safe then:
# it finishes pending removals and releases ids whose devices are gone.
# Anything else stays a finding: in the log, in "thin-snapshotter status" and
# in the metrics. It also checks once after a start whose recovery did
# something. A duration ("1h", "30m"), at least {{ .MinCheckInterval }}; "0" turns it off.
check_interval = {{ value .CheckInterval }}

[pool]
# The dm name of an existing device-mapper thin pool, as "dmsetup ls" shows
# it. For an LVM thin pool set lvm instead. Both empty: the embedded pool,
# made of sparse data and metadata files under root on loop devices, created
# on the first start and reused later, named after root so daemons with
# different roots run side by side. The embedded pool is meant for
# development and trials.
name = {{ value .Pool.Name }}

# An LVM thin pool as "vg/lv" (e.g. "vg0/thinpool"), instead of name. LVM
# gives its thin-pool target the dm name "vg-lv" while the pool has no LVM
# thin volumes and "vg-lv-tpool" once it has some; the daemon looks for it
# under both at each start. The pool must be dedicated to this daemon: LVM
# refuses to make thin volumes in a pool whose transaction id the daemon has
# advanced (lvextend keeps working).
lvm = {{ value .Pool.LVM }}

# Embedded pool only (ignored when name or lvm is set): the size of the
# sparse data file, which is the pool's capacity; at least {{ .MinDataSize }}.
data_size = {{ value .Pool.DataSize }}

# Embedded pool only: the size of the sparse metadata file, {{ .MinMetadataSize }} to {{ .MaxMetadataSize }}.
metadata_size = {{ value .Pool.MetadataSize }}

# Embedded pool only: the pool's allocation unit, a multiple of {{ .MinBlockSize }} from
# {{ .MinBlockSize }} to {{ .MaxBlockSize }}. Smaller blocks share more between snapshots and need more
# metadata.
block_size = {{ value .Pool.BlockSize }}

# Embedded pool only: let the pool grow itself up to this size. When less
# than grow_step of its data space is free (or less than min_free_data, or
# less than it fills before a step lands, at the rate it fills), the data
# file grows by grow_step (or 30 seconds of writing at that rate) and the
# pool is reloaded with the new size; the metadata file doubles when under a
# quarter of it is free. While the pool can grow, writes to it when full
# wait for the next step; once it cannot, they fail at once. The pool never
# promises more space than the host file system has free beyond
# grow_host_reserve. Each step is logged. 0: never grow. (An existing pool
# grows with its own tools, e.g. LVM's thin_pool_autoextend_threshold.)
max_data_size = {{ value .Pool.MaxDataSize }}
grow_step = {{ value .Pool.GrowStep }}
grow_host_reserve = {{ value .Pool.GrowHostReserve }}

# The database records which pool it owns and the pool's transaction id. A
# pool whose transaction id or thin devices differ from the database (another
# daemon's pool, or a re-created one) is refused with an error saying what
# differs, unless this is true.
allow_adopt = {{ value .Pool.AllowAdopt }}

# Percentages of the pool's data and metadata space that must stay free for
# new snapshots. Below them (or with the pool out of data space, read-only or
# needing a check) Prepare and View fail with ResourceExhausted or
# FailedPrecondition naming the pool and the numbers, while existing
# snapshots keep working. 0 disables a check.
min_free_data = {{ value .Pool.MinFreeData }}
min_free_metadata = {{ value .Pool.MinFreeMetadata }}

[snapshot]
# Virtual size of every snapshot's filesystem, a multiple of {{ .BaseSizeAlign }} bytes. Thin
# provisioning takes pool space only for blocks written. At least {{ .MinBaseSizeExt4 }} for
# ext4, {{ .MinBaseSizeXFS }} for xfs.
base_size = {{ value .Snapshot.BaseSize }}

# Filesystem of the base device that every snapshot starts from: "ext4" or "xfs".
fs_type = {{ value .Snapshot.FSType }}

# Extra arguments for mkfs.<fs_type> when the base device is made, one
# argument per entry, e.g. ["-b", "4096"].
mkfs_options = {{ value .Snapshot.MkfsOptions }}

# Extra mount options for every snapshot, one option per entry, e.g.
# ["noatime"]. "ro" and "rw" are chosen by the snapshotter.
mount_options = {{ value .Snapshot.MountOptions }}

# Remove snapshots in the background: Remove returns once the removal is
# recorded (journaled, so it survives a crash); the thin device is deleted
# afterwards by the daemon (and by containerd's Cleanup). false deletes it
# before Remove returns.
async_remove = {{ value .Snapshot.AsyncRemove }}

# Mount snapshots with "discard" (online discard): when a container deletes
# files, its filesystem discards their blocks and the pool gets them back at
# once instead of when the snapshot is removed. Whether the pool passes them
# on to its own storage (the embedded pool's sparse data file, the disk under
# a thin LV) depends on the pool's discard passdown and on that storage.
discard = {{ value .Snapshot.Discard }}

# Discard a removed snapshot's blocks before its thin device is deleted, so
# the pool passes them on to its storage: for the embedded pool the sparse
# data file shrinks and the host gets the space back. Deleting alone frees
# them only inside the pool. Costs time on devices holding much data. One of
# {{ .DiscardOnDeleteValues }}; "auto" is on for the embedded pool and off for
# an existing pool.
discard_on_delete = {{ value .Snapshot.DiscardOnDelete }}

[nri]
# Per-pod disk sizes: pods ask for them with annotations
# ({{ .NRIPodKey }}: 50Gi, or
# {{ .NRIContainerKey }} for one container), which
# the daemon applies as a plugin of containerd's NRI (Node Resource
# Interface, on by default in containerd 2.x): before a container on thin
# starts, its root filesystem grows to the size its pod asks for. true
# registers with NRI whenever socket_path exists (the daemon waits for it
# and reconnects when containerd restarts); false: annotations are ignored.
enable = {{ value .NRI.Enable }}

# containerd's NRI socket: [plugins."io.containerd.nri.v1.nri"] socket_path.
socket_path = {{ value .NRI.SocketPath }}

[imagefs]
# What the kubelet sees of the image filesystem. CRI reports the directory
# that containerd's exports root names, <root>/imagefs, and the kubelet
# takes the image filesystem's capacity and free space from statfs there,
# for its image garbage collection and disk-pressure eviction. true mounts
# a small filesystem there whose size is the pool's data size and whose
# available space is the pool's free data space less min_free_data,
# updated every few seconds. It costs a loop device and a few MiB under
# root, and stays mounted when the daemon stops: the kubelet knows it by
# its device number. false takes it down; the kubelet then sees the
# filesystem holding root.
mirror = {{ value .ImageFS.Mirror }}

# Size classes: one extra socket each, on the same pool and database, whose
# containers get the class's disk size unless they ask for one (label
# containerd.io/snapshot/max-size). containerd gets one proxy plugin per
# class; image layers are shared between classes, not unpacked again.
# The address defaults to <name>.sock next to the main socket.
{{- range .Classes }}
[[class]]
name = {{ value .Name }}
size = {{ value .Size }}
{{- if .Address }}
address = {{ value .Address }}
{{- end }}
{{- else }}
# [[class]]
# name = "thin-50g"
# size = "50GiB"
{{- end }}
`

var tmpl = template.Must(template.New("config").Funcs(template.FuncMap{"value": tomlValue}).Parse(fileTemplate))

// Render writes cfg as a complete, commented configuration file.
func Render(w io.Writer, cfg *Config) error {
	// The limits printed in the comments are the snapshotter's, the ones
	// its Validate enforces.
	data := struct {
		*Config
		LogLevels                                     string
		DiscardOnDeleteValues                         string
		MinDataSize, MinMetadataSize, MaxMetadataSize ByteSize
		MinBlockSize, MaxBlockSize                    ByteSize
		MinBaseSizeExt4, MinBaseSizeXFS               ByteSize
		BaseSizeAlign                                 int
		MinCheckInterval                              Duration
		NRIPodKey, NRIContainerKey                    string
	}{
		Config:                cfg,
		LogLevels:             strings.Join(logLevels, ", "),
		DiscardOnDeleteValues: strings.Join(discardOnDeleteValues, ", "),
		MinDataSize:           snapshotter.MinDataSize,
		MinMetadataSize:       snapshotter.MinMetadataSize,
		MaxMetadataSize:       snapshotter.MaxMetadataSize,
		MinBlockSize:          snapshotter.MinBlockSize,
		MaxBlockSize:          snapshotter.MaxBlockSize,
		MinBaseSizeExt4:       snapshotter.MinBaseSizeExt4,
		MinBaseSizeXFS:        snapshotter.MinBaseSizeXFS,
		BaseSizeAlign:         snapshotter.BaseSizeAlign,
		MinCheckInterval:      Duration(snapshotter.MinCheckInterval),
		NRIPodKey:             podsize.PodKey,
		NRIContainerKey:       podsize.ContainerKey("<name>"),
	}
	return tmpl.Execute(w, data)
}

// tomlValue renders one value as TOML by marshalling it under a throwaway
// key, so quoting and escaping are go-toml's.
func tomlValue(v any) (string, error) {
	out, err := toml.Marshal(map[string]any{"v": v})
	if err != nil {
		return "", fmt.Errorf("rendering %v: %w", v, err)
	}
	s := strings.TrimSuffix(string(out), "\n")
	val, ok := strings.CutPrefix(s, "v = ")
	if !ok || strings.Contains(val, "\n") {
		return "", fmt.Errorf("rendering %v: unexpected TOML %q", v, s)
	}
	return val, nil
}
