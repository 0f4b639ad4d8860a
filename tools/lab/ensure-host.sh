#!/usr/bin/env bash
# Install the host packages the lab needs (QEMU and qemu-img, busybox, pahole, iproute2,
# e2fsprogs, xfsprogs, libvirt),
# idempotently. Needs root for apt-get; does nothing when everything is already there.
source "$(dirname "$0")/common.sh"

# command -> Debian package
declare -A PKG=(
	[qemu-system-x86_64]=qemu-system-x86
	[qemu-img]=qemu-utils
	[busybox]=busybox-static
	[pahole]=dwarves
	[ip]=iproute2
	[tc]=iproute2
	[mkfs.ext4]=e2fsprogs
	[debugfs]=e2fsprogs
	[mkfs.xfs]=xfsprogs
	[xfs_db]=xfsprogs
	[xz]=xz-utils
	[zstd]=zstd
	[cpio]=cpio
	[sfdisk]=fdisk
	[python3]=python3
	[readelf]=binutils
	# tests/migrate_libvirt.rs: two libvirt daemons (tools/lab/libvirt.sh)
	[libvirtd]=libvirt-daemon-system
	[virsh]=libvirt-clients
	[unshare]=util-linux
)

missing=()
for cmd in "${!PKG[@]}"; do
	if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
		missing+=("${PKG[$cmd]}")
	fi
done
# busybox must be the static build: it runs inside the guest.
# /usr/bin/time (the benchmarks' peak-memory figures): `time` alone is the shell keyword.
[ -x /usr/bin/time ] || missing+=(time)
if ! dpkg -s busybox-static >/dev/null 2>&1; then
	missing+=(busybox-static)
fi
# libvirt's QEMU driver is a package of its own.
if ! dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1; then
	missing+=(libvirt-daemon-driver-qemu)
fi

if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
[ "$(id -u)" -eq 0 ] || die "host packages missing: ${missing[*]}; install them as root (apt-get install ${missing[*]})"
note "installing host packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# An old or missing package list makes install fail; refresh it once per run at most.
apt-get update -q >/dev/null || die "apt-get update failed: no package registry reachable?"
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/pct-apt.log 2>&1; then
	tail -20 /tmp/pct-apt.log >&2
	die "apt-get install ${missing[*]} failed (log above); QEMU and busybox-static come from Debian's qemu-system-x86 and busybox-static packages"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing after installing qemu-system-x86"
