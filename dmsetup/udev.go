package dmsetup

// UdevFlags tell the standard device-mapper udev rules (10-dm.rules,
// 13-dm-disk.rules; Debian: 55-dm.rules, 60-persistent-storage-dm.rules)
// what to do with the uevent of a resume or remove. The kernel hands the
// ioctl's event_nr to udev as DM_COOKIE; its upper 16 bits are these flags
// (libdevmapper's DM_UDEV_*_FLAG values), decoded by `dmsetup udevflags`.
// The lower 16 bits name a libdevmapper notification semaphore: we leave
// them 0 (none), as libdevmapper does when it does not wait for udev.
type UdevFlags uint16

// The flags, with libdevmapper's values.
const (
	// UdevDisableDMRules: no /dev/mapper/<name> link from udev.
	UdevDisableDMRules UdevFlags = 0x0001
	// UdevDisableSubsystemRules: LVM, cryptsetup and the like skip it.
	UdevDisableSubsystemRules UdevFlags = 0x0002
	// UdevDisableDiskRules: no blkid probe, no /dev/disk/by-* links.
	UdevDisableDiskRules UdevFlags = 0x0004
	// UdevDisableOtherRules: everything else skips it (systemd marks it
	// not ready, no units are started for it).
	UdevDisableOtherRules UdevFlags = 0x0008
	// UdevLowPriority: lower priority for its /dev/disk links.
	UdevLowPriority UdevFlags = 0x0010
	// UdevDisableLibraryFallback: libdevmapper does not make nodes itself.
	UdevDisableLibraryFallback UdevFlags = 0x0020
	// UdevPrimarySource: this event is the device's own (a resume), not a
	// synthetic one; the rules store the flags for later events.
	UdevPrimarySource UdevFlags = 0x0040
)

// UdevPrivate are the flags for devices only their creator uses: udev makes
// /dev/mapper/<name> but probes nothing (no blkid, no /dev/disk/by-uuid
// links, which collide when snapshots share a filesystem UUID) and starts
// nothing for them.
const UdevPrivate = UdevPrimarySource | UdevDisableSubsystemRules | UdevDisableDiskRules | UdevDisableOtherRules

const udevFlagsShift = 16

// cookie is the event_nr of a resume or remove carrying f.
func (f UdevFlags) cookie() uint32 { return uint32(f) << udevFlagsShift }
