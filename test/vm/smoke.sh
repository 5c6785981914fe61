#!/bin/bash
# test/vm/smoke.sh: checks that the VM bench's kernel and tools can run a
# thin pool end to end with the dmsetup CLI: pool and thin device on loop
# devices, ext4 on the thin device, a snapshot of it, xfs on another thin
# device, then thin_check of the metadata. Run on a host without
# device-mapper, it re-runs itself in the VM.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
if [[ ${THIN_VM:-} != 1 ]] && ! "$here/have-dm"; then
	exec "$here/run" -- "$here/smoke.sh" "$@"
fi

# No udev in the VM: dmsetup creates /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

step() {
	printf 'smoke: %s\n' "$*"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/thin-smoke.XXXXXX")
pool=thin-smoke-pool-$$
thin=thin-smoke-thin-$$
snap=thin-smoke-snap-$$
thinx=thin-smoke-xfs-$$
meta_dev=
data_dev=
cleanup() {
	set +e
	for m in "$work/mnt" "$work/snap" "$work/xfs"; do
		mountpoint -q "$m" && umount "$m"
	done
	for d in "$thinx" "$snap" "$thin" "$pool"; do
		dmsetup info "$d" >/dev/null 2>&1 && dmsetup remove "$d"
	done
	[[ -z $meta_dev ]] || losetup -d "$meta_dev"
	[[ -z $data_dev ]] || losetup -d "$data_dev"
	rm -rf -- "$work"
}
trap cleanup EXIT

step "kernel $(uname -r); $(grep -w device-mapper /proc/misc)"
dmsetup targets | grep -q '^thin-pool ' || { echo "smoke: no thin-pool target" >&2; exit 1; }

truncate -s 16M "$work/meta"
truncate -s 1G "$work/data"
meta_dev=$(losetup --find --show "$work/meta")
data_dev=$(losetup --find --show "$work/data")
step "loop devices $meta_dev (metadata) $data_dev (data)"

# A fresh pool needs zeroed metadata: its first block must not look valid.
dd if=/dev/zero of="$meta_dev" bs=4096 count=1 status=none
sectors=$(blockdev --getsz "$data_dev")
# 64 KiB data blocks (128 sectors), low water mark 0 blocks.
dmsetup create "$pool" --table "0 $sectors thin-pool $meta_dev $data_dev 128 0"
step "pool: $(dmsetup status "$pool")"

dmsetup message "$pool" 0 "create_thin 0"
dmsetup create "$thin" --table "0 2097152 thin /dev/mapper/$pool 0"
ls -l "/dev/mapper/$thin"
mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1 "/dev/mapper/$thin"
mkdir -p "$work/mnt" "$work/snap" "$work/xfs"
mount "/dev/mapper/$thin" "$work/mnt"
echo "written before the snapshot" >"$work/mnt/file"
sync
step "ext4 on thin device 0: $(cat "$work/mnt/file")"

# A snapshot of an active thin device is taken with the origin suspended.
dmsetup suspend "$thin"
dmsetup message "$pool" 0 "create_snap 1 0"
dmsetup resume "$thin"
echo "written after the snapshot" >"$work/mnt/file"
sync
dmsetup create "$snap" --table "0 2097152 thin /dev/mapper/$pool 1"
mount -o ro,noload "/dev/mapper/$snap" "$work/snap"
got=$(cat "$work/snap/file")
[[ $got == "written before the snapshot" ]] ||
	{ echo "smoke: snapshot reads '$got'" >&2; exit 1; }
step "snapshot 1 of 0: $got; origin: $(cat "$work/mnt/file")"

dmsetup message "$pool" 0 "create_thin 2"
dmsetup create "$thinx" --table "0 2097152 thin /dev/mapper/$pool 2"
mkfs.xfs -q "/dev/mapper/$thinx"
mount "/dev/mapper/$thinx" "$work/xfs"
echo xfs >"$work/xfs/file"
sync
step "xfs on thin device 2: $(cat "$work/xfs/file")"
step "pool: $(dmsetup status "$pool")"

umount "$work/xfs" "$work/snap" "$work/mnt"
dmsetup remove "$thinx"
dmsetup remove "$snap"
dmsetup remove "$thin"
dmsetup remove "$pool"
thin_check "$meta_dev"
step "thin_check: metadata clean; devices: $(thin_ls --no-headers -o DEV "$meta_dev" | tr -s ' \n' ' ')"

# The bench's scratch disk is a real block device.
if [[ -n ${THIN_TEST_DISK:-} ]]; then
	[[ -b $THIN_TEST_DISK ]] || { echo "smoke: $THIN_TEST_DISK is no block device" >&2; exit 1; }
	step "scratch disk $THIN_TEST_DISK: $(blockdev --getsize64 "$THIN_TEST_DISK") bytes"
fi
step OK
