#!/usr/bin/env bash
# What the switchover check costs in downtime: the apache guest (1 GiB) migrates with pct
# over a shaped link, N times with the check on and N times with it off, alternating; the
# source resumes (`cont`) after each migration and the next one starts from it. Prints each
# run's downtime (source STOP to destination RESUME, and as QEMU reports it), the check's own
# time, pages it re-sent, and the medians.
#
#   bash tools/bench-switchover.sh [N] [RATE]      (default 4 each, 50mbit; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4} rate=${2:-50mbit}
source tools/migrate-lib.sh
ml_start switchover "$rate"

echo "== booting the apache guest"
ml_guest a "$RUN/src" "pct-bso-src-$$" --workload apache
ml_wait_serial "$RUN/src" PCT-READY
cp --sparse=always "$RUN/src/disk.img" "$RUN/b.img"

for i in $(seq 1 $((2 * n))); do
	mode=auto
	[ $((i % 2)) -eq 0 ] && mode=off
	ml_guest b "$RUN/d$i" "pct-bso-d$i-$$" --workload apache --disk "$RUN/b.img" --incoming
	ml_pct "$RUN/src" "$RUN/d$i" "$RUN/b.img" "$RUN/p$i" --switchover-check "$mode"
	echo "$mode" >"$RUN/p$i.mode"
	ml_stop "$RUN/d$i"
	qmp "$RUN/src/qmp.sock" cont >/dev/null
	sleep 2
done

python3 - "$RUN" "$((2 * n))" "$rate" <<'PY'
import json, statistics, sys
run, n, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {"auto": [], "off": []}
print(f"apache guest, 1 GiB, pct over {rate}")
for i in range(1, n + 1):
    j = json.load(open(f"{run}/p{i}.json"))
    mode = open(f"{run}/p{i}.mode").read().strip()
    t, c = j["time"], j.get("switchover_check") or {}
    rows[mode].append(t["downtime_end_to_end_ms"])
    print(f"  run {i}  check {'on ' if mode == 'auto' else 'off'}  downtime {t['downtime_end_to_end_ms']:5.0f} ms"
          f" (QEMU {t['downtime_qemu_ms']} ms)  check {c.get('time', 0):3.0f} ms  re-sent {c.get('pages_resent', '-')}")
on, off = statistics.median(rows["auto"]), statistics.median(rows["off"])
print(f"median downtime: check on {on:.0f} ms, off {off:.0f} ms, on/off {on / off:.2f}")
PY
