#!/usr/bin/env bash
# The main job: boot the default lab guest (Debian 6.1 cloud kernel, the `apache`
# workload: 1024 x 300 KB files read at boot) and show what pct finds in it.
#
#   bash tools/demo.sh
#
# Installs what it needs on a fresh machine (run as root), caches downloads, and always
# stops the guest and removes its RAM file on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/lab/ensure-host.sh
kdir=$(bash tools/lab/fetch-kernel.sh cloud-amd64 | tail -1)

echo "== building pct"
cargo build --release --quiet
pct=target/release

run=$(mktemp -d /tmp/pct-demo.XXXXXX)
qemu_pid=
cleanup() {
	[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null || true
	[ -f "$run/ram.path" ] && rm -f "$(cat "$run/ram.path")"
	rm -rf "$run"
}
trap cleanup EXIT INT TERM

echo "== booting the default guest (apache workload) under QEMU"
start=$(date +%s%N)
bash tools/lab/run-guest.sh --dir "$run" --workload apache --name "pct-demo-$$" >"$run/qemu.log" 2>&1 &
qemu_pid=$!
until grep -q PCT-READY "$run/serial.log" 2>/dev/null; do
	kill -0 "$qemu_pid" 2>/dev/null || { cat "$run/qemu.log"; echo "demo: the guest did not start" >&2; exit 1; }
	sleep 0.2
done
ms=$((($(date +%s%N) - start) / 1000000))
echo "guest ready after $((ms / 1000)).$((ms % 1000 / 100)) s"
python3 tools/lab/oracle-summary.py "$run/oracle.img"

profile=profiles/debian-$(cat "$kdir/release").json
if [ -x "$pct/pct-introspect" ] && "$pct/pct-introspect" --help | grep -q build-profile; then
	echo "== pct-introspect build-profile $kdir/vmlinux"
	/usr/bin/time -f "built in %e s, peak RSS %M KiB" "$pct/pct-introspect" build-profile "$kdir/vmlinux" -o "$run/profile.json"
	profile=$run/profile.json
fi
if "$pct/pct-introspect" --help | grep -q '^  scan'; then
	echo "== pct-introspect scan (the guest keeps running; pct reads its RAM from outside)"
	"$pct/pct-introspect" scan --profile "$profile" --memory "$(cat "$run/ram.path")" --disk "$run/disk.img" --verify
fi
