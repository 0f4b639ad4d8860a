#!/usr/bin/env bash
# The pct profile of the lab's guest kernel: whatever kernel fetch-kernel.sh resolves today.
#
#   tools/lab/lab-profile.sh [cloud-amd64|amd64|rt-amd64]   (default: cloud-amd64)
#
# Fetches the kernel if needed and prints the path of its profile,
# $PCT_CACHE/profiles/<build-id>.json, built with `pct-introspect build-profile` from the
# kernel's vmlinux (plus ext4.ko.debug where ext4 is a module) when the cache lacks it or
# holds one older than the manifest or the profile builder (src/profile/). The Rust tests'
# lab_profile() (tests/support/profile.rs) reads and writes the same cache.
source "$(dirname "$0")/common.sh"

FLAVOUR=${1:-cloud-amd64}
kdir=$(bash "$LAB_DIR/fetch-kernel.sh" "$FLAVOUR" | tail -1)
vmlinux=$kdir/vmlinux
[ -r "$vmlinux" ] || die "fetch-kernel.sh $FLAVOUR gave no vmlinux in $kdir"

# The GNU build-id note of vmlinux (what the guest's VMCOREINFO BUILD-ID= carries).
build_id=$(readelf -n "$vmlinux" 2>/dev/null | awk '/Build ID:/ {print $3; exit}')
[ -n "$build_id" ] || die "cannot read the build-id of $vmlinux (readelf -n)"

dir=$PCT_CACHE/profiles
out=$dir/$build_id.json
mkdir -p "$dir"
if [ -s "$out" ] && [ -z "$(find "$REPO_DIR/symbols/manifest.toml" "$REPO_DIR/src/profile" -newer "$out" -print -quit)" ]; then
	echo "$out"
	exit 0
fi

modules=()
[ -e "$kdir/ext4.ko.debug" ] && modules=(--module "$kdir/ext4.ko.debug")
(cd "$REPO_DIR" && cargo build --release --quiet --bin pct-introspect) >&2 ||
	die "cannot build pct-introspect (cargo build --release --bin pct-introspect)"
tmp=$(mktemp "$dir/.tmp.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"$REPO_DIR/target/release/pct-introspect" build-profile "$vmlinux" "${modules[@]}" -o "$tmp" >&2 ||
	die "pct-introspect build-profile $vmlinux failed"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
