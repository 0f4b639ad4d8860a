# Shared settings for the lab scripts (sourced, not run).
#
# Everything the lab downloads or builds lives under $PCT_CACHE, so a second run
# reuses it. The scripts are idempotent: they check what is there and build only
# what is missing or out of date.

set -euo pipefail

PCT_CACHE=${PCT_CACHE:-/var/cache/pct}
LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAB_DIR/../.." && pwd)
export PCT_CACHE

die() {
	echo "pct lab: error: $*" >&2
	exit 1
}

note() {
	echo "pct lab: $*" >&2
}

need_root_or_tools() {
	# $@: commands that must exist after ensure-host.sh
	local missing=()
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	[ ${#missing[@]} -eq 0 ] || die "missing host tools: ${missing[*]}; run tools/lab/ensure-host.sh (as root) first"
}

# qemu_prefix_of CHOICE: prints the QEMU prefix a choice names, empty for the system's QEMU.
#   system, 7.2 or empty   the machine's qemu-system-x86_64 (Debian 12: QEMU 7.2)
#   backports, 10          bookworm-backports' QEMU (10.0), unpacked by fetch-qemu.sh
#   PREFIX                 a directory holding usr/bin/qemu-system-x86_64 and usr/share/qemu
# PCT_QEMU picks the source's QEMU and PCT_QEMU_DST the destination's (default: PCT_QEMU).
qemu_prefix_of() {
	case "${1:-}" in
	"" | system | 7.2) ;;
	backports | 10 | 10.0) bash "$LAB_DIR/fetch-qemu.sh" | tail -1 ;;
	*)
		[ -x "$1/usr/bin/qemu-system-x86_64" ] ||
			die "QEMU choice '$1': give system, backports, or a prefix holding usr/bin/qemu-system-x86_64"
		echo "$1"
		;;
	esac
}

# Atomically publish a directory built in a temporary place.
publish_dir() {
	local tmp=$1 final=$2
	rm -rf "$final.old"
	[ -e "$final" ] && mv "$final" "$final.old"
	mv "$tmp" "$final"
	rm -rf "$final.old"
}

# private_apt SUITE: sets apt_opts to a private sources list and state directory serving
# Debian SUITE (bookworm-backports, trixie, bullseye…) from the machine's own Debian mirror,
# refreshed once; the machine's installed packages and its own lists are left alone.
private_apt() {
	local suite=$1 mirror dir
	mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
		mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
	fi
	[ -n "$mirror" ] || die "cannot find the machine's Debian mirror in /etc/apt/sources.list(.d)"
	dir=$PCT_CACHE/apt-$suite
	mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$dir/sources.list"
	apt_opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
	if [ ! -f "$dir/.updated" ] || [ -n "$(find "$dir/.updated" -mmin +720)" ]; then
		apt-get "${apt_opts[@]}" update -q >/dev/null 2>&1 || die "apt-get update of $suite failed (mirror $mirror)"
		touch "$dir/.updated"
	fi
}
