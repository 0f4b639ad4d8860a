#!/usr/bin/env bash
# Build the lab's busybox initramfs for a fetched kernel.
#
#   tools/lab/build-initramfs.sh KERNEL_DIR      (prints the .cpio.gz path)
#
# Contents: static busybox, the guest init (tools/lab/guest/init), pct-oracle and
# pct-readrate (built here, static), and the modules the guest needs (virtio PCI + block, qemu_fw_cfg so
# QEMU dumps carry VMCOREINFO, ext4 where it is a module), loaded in the order their
# `depends=` fields require, and, listed apart in /etc/modules.xfs for guests that mount
# an XFS filesystem, xfs and what it depends on. Cached by a hash of its inputs.
source "$(dirname "$0")/common.sh"

KDIR=${1:?usage: build-initramfs.sh KERNEL_DIR}
[ -f "$KDIR/.complete" ] || die "$KDIR is not a fetched kernel (run tools/lab/fetch-kernel.sh)"
need_root_or_tools gcc objcopy cpio gzip
[ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 || die "static busybox missing: run tools/lab/ensure-host.sh"

release=$(cat "$KDIR/release")
key=$(cat "$LAB_DIR/guest/init" "$LAB_DIR/guest/pct-oracle.c" "$LAB_DIR/guest/pct-readrate.c" "$0" "$KDIR/version" /bin/busybox | sha256sum | cut -c1-16)
out=$PCT_CACHE/initramfs/$release-$key.cpio.gz
mkdir -p "$PCT_CACHE/initramfs"
exec 9>"$PCT_CACHE/initramfs/.lock"
flock 9
if [ -f "$out" ]; then
	echo "$out"
	exit 0
fi

# crc32c_generic: ext4's metadata checksums ask the crypto API for crc32c (a soft
# dependency, not in depends=), so load it before ext4 where ext4 is a module.
WANT=(virtio_pci virtio_blk qemu_fw_cfg crc32c_generic ext4)

# name -> path of the module file (names use '_', files may use '-')
declare -A PATHS
while IFS= read -r -d '' f; do
	n=$(basename "$f" .ko)
	PATHS[${n//-/_}]=$f
done < <(find "$KDIR/modules" -name '*.ko' -print0)

modinfo_depends() {
	objcopy -O binary --only-section=.modinfo "$1" /dev/stdout 2>/dev/null | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}

declare -A DONE
ORDER=()
visit() {
	local name=${1//-/_}
	[ -n "${DONE[$name]:-}" ] && return 0
	DONE[$name]=1
	local path=${PATHS[$name]:-}
	if [ -z "$path" ]; then
		# built into this kernel?
		grep -qE "/${name//_/[-_]}\.ko$" "$KDIR/modules.builtin" && return 0
		die "module $name is neither in $KDIR/modules nor built in"
	fi
	local d
	for d in $(modinfo_depends "$path"); do visit "$d"; done
	ORDER+=("$path")
}
for m in "${WANT[@]}"; do visit "$m"; done
# XFS (a module on Debian's kernels): loaded only by guests with pct.xfs= (see guest/init).
nbase=${#ORDER[@]}
if [ -n "${PATHS[xfs]:-}" ]; then visit xfs; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmpfs,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
gcc -static -O2 -Wall -Wextra -o "$root/bin/pct-oracle" "$LAB_DIR/guest/pct-oracle.c" ||
	die "cannot build the guest oracle (gcc -static needs libc6-dev)"
gcc -static -O2 -Wall -Wextra -o "$root/bin/pct-readrate" "$LAB_DIR/guest/pct-readrate.c" ||
	die "cannot build the guest's read-rate probe (gcc -static needs libc6-dev)"
install -m 0755 "$LAB_DIR/guest/init" "$root/init"
: >"$root/etc/modules.order"
: >"$root/etc/modules.xfs"
n=0
for p in "${ORDER[@]}"; do
	b=$(basename "$p")
	cp "$p" "$root/lib/modules/$b"
	if [ $n -lt "$nbase" ]; then echo "$b" >>"$root/etc/modules.order"; else echo "$b" >>"$root/etc/modules.xfs"; fi
	n=$((n + 1))
done
note "initramfs modules in load order: $(tr '\n' ' ' <"$root/etc/modules.order")(for XFS: $(tr '\n' ' ' <"$root/etc/modules.xfs"))"
mkdir -p "$PCT_CACHE/initramfs"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
