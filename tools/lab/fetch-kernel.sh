#!/usr/bin/env bash
# Fetch a Debian guest kernel: vmlinuz, its modules, and the -dbg vmlinux (DWARF).
#
#   tools/lab/fetch-kernel.sh [cloud-amd64|amd64|rt-amd64] [SUITE]
#       (default: cloud-amd64 of bookworm, Debian 12's 6.1; SUITE trixie gives Debian 13's
#        6.12, bullseye Debian 11's 5.10, fetched through a private apt list)
#
# The exact version is resolved from the suite's linux-image-FLAVOUR meta-package, never
# hard-coded.
# Prints the kernel directory: $PCT_CACHE/kernels/<abi>-<flavour>/ holding
#   vmlinuz, vmlinux (with DWARF), modules/ (the .ko files the lab needs, uncompressed),
#   modules.builtin, config, release (uname -r), version (package version),
#   and for modular-ext4 flavours ext4.ko.debug (the ext4 module's DWARF).
source "$(dirname "$0")/common.sh"

FLAVOUR=${1:-cloud-amd64}
SUITE=${2:-bookworm}
case "$FLAVOUR" in
cloud-amd64 | amd64 | rt-amd64) ;;
*) die "unknown kernel flavour '$FLAVOUR' (choose cloud-amd64, amd64 or rt-amd64)" ;;
esac

need_root_or_tools apt-get apt-cache dpkg-deb
apt_opts=()
case "$SUITE" in
bookworm) ;;
bullseye | trixie) private_apt "$SUITE" ;;
*) die "unknown suite '$SUITE' (bookworm, trixie or bullseye)" ;;
esac

meta=linux-image-$FLAVOUR
resolve() {
	apt-cache "${apt_opts[@]}" depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
img=$(resolve)
if [ -z "$img" ]; then
	apt-get "${apt_opts[@]}" update -q >/dev/null 2>&1 || true
	img=$(resolve)
fi
[ -n "$img" ] || die "cannot resolve $meta to a kernel package: is Debian's package index reachable (apt-get update)?"
release=${img#linux-image-}
version=$(apt-cache "${apt_opts[@]}" show "$img" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
[ -n "$version" ] || die "no version found for $img"

kdir=$PCT_CACHE/kernels/$release
mkdir -p "$PCT_CACHE/kernels"
exec 9>"$PCT_CACHE/kernels/.lock-$release"
flock 9
if [ -f "$kdir/.complete" ] && [ "$(cat "$kdir/version")" = "$version" ]; then
	echo "$kdir"
	exit 0
fi

debs=$PCT_CACHE/debs
mkdir -p "$debs"
fetch_deb() {
	local pkg=$1
	local f
	f=$(ls "$debs/${pkg}_"*"${version//:/%3a}"*.deb 2>/dev/null | head -1 || true)
	if [ -z "$f" ]; then
		note "downloading $pkg $version"
		(cd "$debs" && apt-get "${apt_opts[@]}" download -q "$pkg=$version" >/dev/null 2>&1) ||
			die "could not download $pkg=$version; for the -dbg package Debian's debug archive must be in the sources (it is on these machines)"
		f=$(ls "$debs/${pkg}_"*.deb | head -1)
	fi
	echo "$f"
}

image_deb=$(fetch_deb "$img")
dbg_deb=$(fetch_deb "$img-dbg") || die "the debug package $img-dbg is missing: pct needs the -dbg vmlinux to build profiles"

mkdir -p "$PCT_CACHE/kernels"
tmp=$(mktemp -d "$PCT_CACHE/kernels/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ex=$tmp/x
mkdir -p "$ex"
dpkg-deb -x "$image_deb" "$ex"
cp "$ex/boot/vmlinuz-$release" "$tmp/vmlinuz"
cp "$ex/boot/config-$release" "$tmp/config"
moddir=$ex/lib/modules/$release
[ -d "$moddir" ] || moddir=$ex/usr/lib/modules/$release # trixie: merged /usr
cp "$moddir/modules.builtin" "$tmp/modules.builtin"
mkdir -p "$tmp/modules"
# Keep every module (uncompressed); the initramfs builder picks from them by name.
(cd "$moddir/kernel" && find . -name '*.ko*' -print0) | while IFS= read -r -d '' m; do
	mkdir -p "$tmp/modules/$(dirname "$m")"
	case "$m" in
	*.ko.xz) xz -dc "$moddir/kernel/$m" >"$tmp/modules/${m%.xz}" ;;
	*.ko.zst) zstd -qdc "$moddir/kernel/$m" >"$tmp/modules/${m%.zst}" ;;
	*) cp "$moddir/kernel/$m" "$tmp/modules/$m" ;;
	esac
done
rm -rf "$ex"

# From the -dbg package take only vmlinux and, where ext4 is a module, ext4.ko's debug file.
dbgpaths=("./usr/lib/debug/boot/vmlinux-$release")
if [ -e "$tmp/modules/fs/ext4/ext4.ko" ]; then
	dbgpaths+=("./usr/lib/debug/lib/modules/$release/kernel/fs/ext4/ext4.ko")
fi
dpkg-deb --fsys-tarfile "$dbg_deb" | tar -x -C "$tmp" "${dbgpaths[@]}" ||
	die "$dbg_deb does not contain ${dbgpaths[*]}"
mv "$tmp/usr/lib/debug/boot/vmlinux-$release" "$tmp/vmlinux"
if [ -e "$tmp/usr/lib/debug/lib/modules/$release/kernel/fs/ext4/ext4.ko" ]; then
	mv "$tmp/usr/lib/debug/lib/modules/$release/kernel/fs/ext4/ext4.ko" "$tmp/ext4.ko.debug"
fi
rm -rf "$tmp/usr"
echo "$release" >"$tmp/release"
echo "$version" >"$tmp/version"
chmod 755 "$tmp"
touch "$tmp/.complete"
trap - EXIT
mkdir -p "$(dirname "$kdir")"
publish_dir "$tmp" "$kdir"
note "kernel $release ($version) ready in $kdir"
echo "$kdir"
