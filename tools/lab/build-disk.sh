#!/usr/bin/env bash
# Build a lab disk image (ext4, no root needed: mkfs.ext4 -d plus debugfs).
#
#   tools/lab/build-disk.sh FILESET LAYOUT      (prints the image path)
#
# FILESET  web   1024 files x 300 KB of incompressible data in /www (the apache case)
#          mini   128 files x 300 KB in /www (for the layout variants)
#          db    one 300 MB data file in /db (the database case)
# LAYOUT   plain     4 KiB blocks, extents, filesystem at offset 0
#          part      MBR-partitioned disk, filesystem in partition 1 at sector 63 (not 4 KiB aligned)
#          bs1k      1 KiB blocks            bs2k  2 KiB blocks
#          noextent  -O ^extent: block-mapped (direct/indirect) files
#          xfs       MBR-partitioned: partition 1 (sector 2048) the ext4 filesystem as in
#                    plain, partition 2 an XFS filesystem (mkfs.xfs -p, no mount needed)
#                    holding /big (4 x 4 MiB), /small (32 x 300 KB) and /tail (a partial
#                    last page): files the guest reads into large folios
#
# Every disk also has /special: a sparse file with holes, a file whose last page is
# partial, a fragmented file whose
# extent tree has depth >= 1 (or deep indirect blocks), a file the guest deletes while
# holding it open, a file the guest copies to tmpfs; and /SHA256SUMS for the guest's
# `verify` command. The image is a pristine master: run guests on a copy.
source "$(dirname "$0")/common.sh"

FILESET=${1:?usage: build-disk.sh FILESET LAYOUT}
LAYOUT=${2:?usage: build-disk.sh FILESET LAYOUT}
case "$FILESET" in web | mini | db) ;; *) die "unknown fileset '$FILESET' (web, mini, db)" ;; esac
mkfs_opts=(-b 4096)
case "$LAYOUT" in
plain | part) ;;
bs1k) mkfs_opts=(-b 1024) ;;
bs2k) mkfs_opts=(-b 2048) ;;
noextent) mkfs_opts=(-b 4096 -O ^extent,^flex_bg,^huge_file,^64bit) ;;
xfs) need_root_or_tools mkfs.xfs ;;
*) die "unknown layout '$LAYOUT' (plain, part, bs1k, bs2k, noextent, xfs)" ;;
esac
need_root_or_tools mkfs.ext4 debugfs sfdisk sha256sum

key=$(cat "$0" | sha256sum | cut -c1-12)
out=$PCT_CACHE/disks/$FILESET-$LAYOUT-$key.img
mkdir -p "$PCT_CACHE/disks"
exec 9>"$PCT_CACHE/disks/.lock-$FILESET-$LAYOUT"
flock 9
if [ -f "$out" ]; then
	echo "$out"
	exit 0
fi
mkdir -p "$PCT_CACHE/disks"
tmp=$(mktemp -d "$PCT_CACHE/disks/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src=$tmp/src
mkdir -p "$src/special"

rand() { head -c "$1" /dev/urandom; }
case "$FILESET" in
web | mini)
	n=$([ "$FILESET" = web ] && echo 1024 || echo 128)
	mkdir -p "$src/www"
	for i in $(seq -w 0 $((n - 1))); do rand 307200 >"$src/www/file$i.bin"; done
	size_mb=$([ "$FILESET" = web ] && echo 420 || echo 112)
	;;
db)
	mkdir -p "$src/db"
	rand $((300 * 1024 * 1024)) >"$src/db/data"
	size_mb=420
	;;
esac
[ "$LAYOUT" = bs1k ] && size_mb=$((size_mb + size_mb / 8))

# sparse: data, hole, data, hole, one block at the end
f=$src/special/sparse
rand 65536 >"$f"
rand 131072 | dd of="$f" bs=4096 seek=128 conv=notrunc status=none
rand 4096 | dd of="$f" bs=4096 seek=511 conv=notrunc status=none
rand 10000 >"$src/special/tail" # a partial last page (10000 = 2 pages + 1808 bytes)
rand 1048576 >"$src/special/delme"
rand 1048576 >"$src/special/totmpfs"
# The database file changes while the guest runs: only static files are checksummed.
(cd "$src" && find . -type f \( -path './www/*' -o -path ./special/sparse \) -printf '%P\0' | sort -z | xargs -0 -r sha256sum) >"$src/SHA256SUMS"

fs=$tmp/fs.img
truncate -s "${size_mb}M" "$fs"
mkfs.ext4 -q -F -L pct-lab "${mkfs_opts[@]}" -E lazy_itable_init=0,lazy_journal_init=0 -d "$src" "$fs" ||
	die "mkfs.ext4 -d failed for $FILESET/$LAYOUT"

# frag: interleave with filler files, free every other filler, then write the file into the gaps
bs=$(debugfs -R stats "$fs" 2>/dev/null | awk '/^Block size:/ {print $3}')
rand "$bs" >"$tmp/one"
nfill=96
rand $((nfill / 2 * 4096 + 65536)) >"$tmp/frag"
{
	echo "mkdir /special/fill"
	for i in $(seq 0 $((nfill * 4096 / bs - 1))); do echo "write $tmp/one /special/fill/$i"; done
	for i in $(seq 0 2 $((nfill * 4096 / bs - 1))); do echo "rm /special/fill/$i"; done
	echo "write $tmp/frag /special/frag"
} >"$tmp/debugfs.cmd"
debugfs -w -f "$tmp/debugfs.cmd" "$fs" >/dev/null 2>&1 || die "debugfs could not build /special/frag"
(cd "$tmp" && sha256sum frag | sed 's| frag| special/frag|') >>"$tmp/sums"
debugfs -R "dump /SHA256SUMS $tmp/SHA256SUMS" "$fs" >/dev/null 2>&1
cat "$tmp/sums" >>"$tmp/SHA256SUMS"
debugfs -w -R "rm /SHA256SUMS" "$fs" >/dev/null 2>&1
debugfs -w -R "write $tmp/SHA256SUMS /SHA256SUMS" "$fs" >/dev/null 2>&1
e2fsck -fn "$fs" >/dev/null 2>&1 || die "e2fsck finds the built $FILESET/$LAYOUT filesystem inconsistent"

if [ "$LAYOUT" = part ]; then
	start=63
	disk=$tmp/disk.img
	fs_sectors=$(($(stat -c %s "$fs") / 512))
	truncate -s $(((start + fs_sectors + 2048) * 512)) "$disk"
	echo "start=$start, size=$fs_sectors, type=83" | sfdisk -q --no-reread --no-tell-kernel "$disk" >/dev/null 2>&1 ||
		die "sfdisk could not partition the disk image"
	dd if="$fs" of="$disk" bs=512 seek=$start conv=notrunc,sparse status=none
	mv "$disk" "$out.tmp"
elif [ "$LAYOUT" = xfs ]; then
	# The XFS part: files written by mkfs.xfs from a prototype file (its extents are what
	# the mkfs allocator gives: one or a few per file). XFS needs at least 300 MB.
	xsrc=$tmp/xsrc
	mkdir -p "$xsrc/big" "$xsrc/small"
	for i in 0 1 2 3; do rand $((4 << 20)) >"$xsrc/big/file$i"; done
	for i in $(seq -w 0 31); do rand 307200 >"$xsrc/small/f$i"; done
	rand 1000000 >"$xsrc/tail"
	{
		echo /dev/null
		echo 0 0
		echo "d--755 0 0"
		echo "big d--755 0 0"
		for i in 0 1 2 3; do echo "file$i ---644 0 0 $xsrc/big/file$i"; done
		echo '$'
		echo "small d--755 0 0"
		for i in $(seq -w 0 31); do echo "f$i ---644 0 0 $xsrc/small/f$i"; done
		echo '$'
		echo "tail ---644 0 0 $xsrc/tail"
		echo '$'
	} >"$tmp/xfs.proto"
	xfs=$tmp/xfs.img
	truncate -s 320M "$xfs"
	mkfs.xfs -q -f -L pct-xfs -p "$tmp/xfs.proto" "$xfs" >/dev/null || die "mkfs.xfs -p failed"
	rm -rf "$xsrc"
	start=2048
	disk=$tmp/disk.img
	fs_sectors=$(($(stat -c %s "$fs") / 512))
	xfs_start=$((start + fs_sectors))
	xfs_sectors=$(($(stat -c %s "$xfs") / 512))
	truncate -s $(((xfs_start + xfs_sectors + 2048) * 512)) "$disk"
	printf 'start=%s, size=%s, type=83\nstart=%s, size=%s, type=83\n' "$start" "$fs_sectors" "$xfs_start" "$xfs_sectors" |
		sfdisk -q --no-reread --no-tell-kernel "$disk" >/dev/null 2>&1 ||
		die "sfdisk could not partition the disk image"
	dd if="$fs" of="$disk" bs=512 seek=$start conv=notrunc,sparse status=none
	dd if="$xfs" of="$disk" bs=512 seek=$xfs_start conv=notrunc,sparse status=none
	mv "$disk" "$out.tmp"
else
	mv "$fs" "$out.tmp"
fi
mv "$out.tmp" "$out"
# Masters built by an older version of this script are not needed any more.
find "$PCT_CACHE/disks" -maxdepth 1 -name "$FILESET-$LAYOUT-*.img" ! -name "$(basename "$out")" -delete
echo "$out"
