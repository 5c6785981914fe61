package dmsetup

// UdevFlags tell the standard device-mapper udev rules (10-dm.rules,
// 13-dm-disk.rules; Debian: 55-dm.rules, 60-persistent-storage-dm.rules)
// what to do with the uevent of a resume or remove. The kernel hands the
// ioctl's event_nr to udev as DM_COOKIE; its upper 16 bits are these flags
// (libdevmapper's DM_UDEV_*_FLAG values), decoded by `dmsetup udevflags`.
// The lower 16 bits name a libdevmapper notification semaphore: we leave
// them 0 (none), as libdevmapper does when it does not wait for udev.
type UdevFlags uint16

// The flags we use, with libdevmapper's values. libdevmapper defines more
// (0x0001 disables the /dev/mapper link, 0x0010 lowers the priority of the
// /dev/disk links, 0x0020 stops libdevmapper making nodes itself); we need
// none of them.
const (
	// udevDisableSubsystemRules makes LVM, cryptsetup and the like skip
	// the device.
	udevDisableSubsystemRules UdevFlags = 0x0002
	// udevDisableDiskRules stops the blkid probe and the /dev/disk/by-*
	// links.
	udevDisableDiskRules UdevFlags = 0x0004
	// udevDisableOtherRules makes every other rule skip the device:
	// systemd marks it not ready and starts no units for it.
	udevDisableOtherRules UdevFlags = 0x0008
	// UdevPrimarySource says the event is the device's own (a resume), not
	// a synthetic one; the rules store the flags for later events.
	UdevPrimarySource UdevFlags = 0x0040
)

// UdevPrivate are the flags for devices only their creator uses: udev makes
// /dev/mapper/<name> but probes nothing (no blkid, no /dev/disk/by-uuid
// links, which collide when snapshots share a filesystem UUID) and starts
// nothing for them.
const UdevPrivate = UdevPrimarySource | udevDisableSubsystemRules | udevDisableDiskRules | udevDisableOtherRules

const udevFlagsShift = 16

// cookie is the event_nr that hands f to the udev rules in a resume or a
// remove: the flags in the upper 16 bits, no semaphore in the lower ones.
func (f UdevFlags) cookie() uint32 { return uint32(f) << udevFlagsShift }
