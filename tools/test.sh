#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a used one (run as root on a fresh one:
# it installs QEMU, busybox, pahole and the Debian guest kernel it needs, then caches them).
#
#   bash tools/test.sh [extra cargo test arguments]
#
# Afterwards it checks that the suite left no QEMU process, guest RAM file, libvirt daemon
# or network namespace behind.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/lab/ensure-host.sh
bash tools/lab/fetch-kernel.sh cloud-amd64 >/dev/null
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
# Independent tools the tests compare pct with: drgn (page-cache walk) and Volatility 3 (ISF).
python3 -c 'import drgn, volatility3' 2>/dev/null ||
	python3 -m pip install -q --disable-pip-version-check drgn volatility3 ||
	{ echo "test.sh: cannot install drgn and volatility3 from PyPI" >&2; exit 1; }

# What was there before the suite started (a demo killed midway, say) is not the suite's.
leftovers() {
	{
		pgrep -f 'qemu-system-x86_64 -name pct-' | sed 's/^/QEMU pid /' || true
		ls /dev/shm | grep '^pct-' | sed 's|^|/dev/shm/|' || true
		# tests/migrate_libvirt.rs: its daemons, their guests and its network namespaces.
		pgrep -f 'pct-libvirt-' | sed 's/^/libvirt pid /' || true
		ip netns list 2>/dev/null | grep -E '^lv[0-9]+-[ab]' | sed 's/^/namespace /' || true
	} | sort
}
before=$(leftovers)
[ -z "$before" ] || echo "test.sh: already present before the suite, not counted:" $before >&2

status=0
# Release mode: the tests parse a 590 MB vmlinux and 1 GiB guest images.
cargo test --release --all-targets --no-fail-fast "$@" || status=$?

left=$(comm -13 <(echo "$before") <(leftovers) | grep . || true)
if [ -n "$left" ]; then
	echo "test.sh: the suite left things behind:" $left >&2
	status=1
fi
exit $status
