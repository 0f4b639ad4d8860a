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

# Atomically publish a directory built in a temporary place.
publish_dir() {
	local tmp=$1 final=$2
	rm -rf "$final.old"
	[ -e "$final" ] && mv "$final" "$final.old"
	mv "$tmp" "$final"
	rm -rf "$final.old"
}
