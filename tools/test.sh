#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a used one (run as root on a fresh one:
# it installs QEMU, busybox, pahole and the Debian guest kernel it needs, then caches them).
#
#   bash tools/test.sh [extra cargo test arguments]
#
# Afterwards it checks that no QEMU process and no guest RAM file was left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/lab/ensure-host.sh
bash tools/lab/fetch-kernel.sh cloud-amd64 >/dev/null
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
# Independent tools the tests compare pct with: drgn (page-cache walk) and Volatility 3 (ISF).
python3 -c 'import drgn, volatility3' 2>/dev/null ||
	python3 -m pip install -q --disable-pip-version-check drgn volatility3 ||
	{ echo "test.sh: cannot install drgn and volatility3 from PyPI" >&2; exit 1; }

status=0
# Release mode: the tests parse a 590 MB vmlinux and 1 GiB guest images.
cargo test --release --all-targets --no-fail-fast "$@" || status=$?

left_qemu=$(pgrep -f 'qemu-system-x86_64 -name pct-' || true)
left_shm=$(ls /dev/shm | grep '^pct-' || true)
# tests/migrate_libvirt.rs: its daemons, their guests and its network namespaces.
left_libvirt=$(pgrep -f 'pct-libvirt-' || true)
left_netns=$(ip netns list 2>/dev/null | grep -E '^lv[0-9]+-[ab]' || true)
if [ -n "$left_qemu$left_shm$left_libvirt$left_netns" ]; then
	echo "test.sh: the suite left things behind: QEMU pids [$left_qemu] /dev/shm [$left_shm]" \
		"libvirt pids [$left_libvirt] namespaces [$left_netns]" >&2
	status=1
fi
exit $status
