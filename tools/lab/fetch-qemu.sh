#!/usr/bin/env bash
# Fetch a newer QEMU to run beside the system's: qemu-system-x86 (with -common and -data)
# from bookworm-backports, on the same mirror as the machine's own Debian sources, unpacked
# with `dpkg -x` into $PCT_CACHE/qemu/<version>/. The installed packages are left alone:
# apt works from a private sources list and state directory.
#
#   tools/lab/fetch-qemu.sh     prints the prefix: PREFIX/usr/bin/qemu-system-x86_64, with
#                               its firmware and data in PREFIX/usr/share/qemu (give -L)
#
# The version is whatever the backports suite offers today (10.0.x), never hard-coded.
source "$(dirname "$0")/common.sh"
need_root_or_tools apt-get apt-cache dpkg-deb

mkdir -p "$PCT_CACHE/qemu"
private_apt bookworm-backports
exec 9>"$PCT_CACHE/qemu/.lock"
flock 9

candidate() {
	apt-cache "${apt_opts[@]}" madison qemu-system-x86 2>/dev/null |
		awk -F'|' '/bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}'
}
version=$(candidate)
[ -n "$version" ] || die "bookworm-backports offers no qemu-system-x86"

prefix=$PCT_CACHE/qemu/${version//[:~+]/_}
if [ -x "$prefix/usr/bin/qemu-system-x86_64" ] && [ -f "$prefix/.complete" ]; then
	echo "$prefix"
	exit 0
fi
tmp=$(mktemp -d "$PCT_CACHE/qemu/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
note "downloading QEMU $version from bookworm-backports"
(cd "$tmp" && apt-get "${apt_opts[@]}" download -q "qemu-system-x86=$version" \
	"qemu-system-common=$version" "qemu-system-data=$version" >/dev/null 2>&1) ||
	die "could not download qemu-system-x86=$version from bookworm-backports"
mkdir -p "$tmp/root"
for deb in "$tmp"/*.deb; do
	dpkg-deb -x "$deb" "$tmp/root"
done
"$tmp/root/usr/bin/qemu-system-x86_64" --version >/dev/null ||
	die "the unpacked QEMU $version does not run here (missing libraries?)"
echo "$version" >"$tmp/root/version"
touch "$tmp/root/.complete"
publish_dir "$tmp/root" "$prefix"
note "QEMU $version ready in $prefix"
echo "$prefix"
