#!/usr/bin/env bash
# Does stock QEMU lose guest writes during a live migration? No pct in the path: a lab
# guest migrates into a file (`migrate exec:cat > FILE`, QEMU's max-bandwidth raised as pct
# does), then `pct-migrate inspect-stream FILE --against RAM` compares every page's last
# record in the stream with the stopped source's RAM. Any difference is a write QEMU's dirty
# tracking missed: the destination would resume without it.
#
#   bash tools/qemu-lost-writes.sh [RUNS] [WORKLOAD] [MEM]
#
# Defaults: 6 runs of the `db` workload (fsync'ed random writes) with 1024 MiB. QEMU 7.2
# under TCG loses writes when the RAM size is a multiple of 256 KiB (its bitmap sync takes a
# word-at-a-time path that leaves the vCPU's TLB writing without dirty tracking; fixed in
# QEMU 9.0, commit 03bfc2188f); MEM=1048584K (1 GiB + 8 KiB) avoids that path. pct's
# switchover check (docs/migration.md) repairs what QEMU lost. PCT_QEMU=backports runs
# bookworm-backports' QEMU 10.0 instead of the system's (tools/lab/common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-6} workload=${2:-db} mem=${3:-1024}
fileset=$workload
[ "$workload" = idle ] && fileset=mini
[ "$workload" = apache ] && fileset=mini

source tools/migrate-lib.sh
ml_start lost

lost_runs=0
for i in $(seq 1 "$runs"); do
	d=$RUN/g$i
	mkdir -p "$d"
	bash tools/lab/run-guest.sh --dir "$d" --qemu "${ML_QEMU_A:-system}" --workload "$workload" --fileset "$fileset" \
		--mem "$mem" --name "pct-lost-$$-$i" >"$d/qemu.out" 2>"$d/qemu.err" &
	ML_PIDS+=($!)
	ML_RAMS+=("/dev/shm/pct-lost-$$-$i")
	ml_wait_serial "$d" PCT-READY
	qmp "$d/qmp.sock" migrate-set-parameters '{"max-bandwidth": 10000000000}' >/dev/null
	qmp "$d/qmp.sock" migrate "{\"uri\": \"exec:cat > $d/stream\"}" >/dev/null
	while :; do
		st=$(qmp "$d/qmp.sock" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status", "?"))')
		case "$st" in completed | failed | cancelled) break ;; esac
		sleep 0.1
	done
	[ "$st" = completed ] || { echo "run $i: migration $st" >&2; exit 1; }
	line=$("$PCT" inspect-stream "$d/stream" --against "/dev/shm/pct-lost-$$-$i" | grep '^against')
	n=$(sed -E 's/.* ([0-9]+) differ.*/\1/' <<<"$line")
	echo "run $i: $n pages of the stopped source differ from their last record in the stream"
	[ "$n" -gt 0 ] && lost_runs=$((lost_runs + 1))
	kill "${ML_PIDS[-1]}"
	wait "${ML_PIDS[-1]}" 2>/dev/null || true
	rm -f "/dev/shm/pct-lost-$$-$i" "$d/stream"
done
echo "$workload guest, --mem $mem, stock QEMU $(ml_qemu_version a): writes lost in $lost_runs of $runs migrations"
