#!/usr/bin/env bash
# Downtime, pct against stock QEMU: the apache guest (1 GiB) migrates N times with pct and
# N times with stock QEMU at each link rate, pct and stock interleaved (pct first in odd
# rounds, stock first in even ones). The source resumes (`cont`) after each migration and
# the next one starts from it; each destination is a fresh QEMU on the mirrored disk.
#
# Prints, per rate: every run's end-to-end downtime (source STOP to destination RESUME, the
# two QEMUs' own event times) and QEMU's own figure, then medians and spread, pct/stock,
# total time and link bytes, and the steps of pct's switchover timeline that took longest
# (median over its runs). The operator's limit is QEMU's `downtime-limit` (300 ms unless
# the source was told otherwise).
#
#   bash tools/bench-downtime.sh [N] [RATES]   (default 5, "50mbit 1gbit"; about 12 minutes)
#
# pct's runs pass PCT_FLAGS to the sender, e.g. PCT_FLAGS="--switchover-check off".
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5} rates=${2:-50mbit 1gbit}
read -r -a flags <<<"${PCT_FLAGS:-}"
source tools/migrate-lib.sh
ml_start downtime "${rates%% *}"

echo "== booting the apache guest"
ml_apache_source "$RUN/src" "pct-bdt-src-$$" "$RUN/b.img"

i=0
for rate in $rates; do
	bash tools/netns.sh rate "$NS" "$rate"
	for round in $(seq 1 "$n"); do
		order="pct stock"
		[ $((round % 2)) -eq 0 ] && order="stock pct"
		for mode in $order; do
			i=$((i + 1))
			ml_guest b "$RUN/d$i" "pct-bdt-d$i-$$" --workload apache --disk "$RUN/b.img" --incoming
			if [ "$mode" = pct ]; then
				ml_pct "$RUN/src" "$RUN/d$i" "$RUN/b.img" "$RUN/r$i" "${flags[@]}"
			else
				ml_stock "$RUN/src" a "$RUN/d$i" 10.77.0.2:7401 "$RUN/r$i"
			fi
			echo "$rate $mode" >"$RUN/r$i.what"
			echo "  $rate $mode run $round: $(jget "$RUN/r$i.json" 'round(j["time"]["downtime_end_to_end_ms"] if "time" in j else j["downtime_end_to_end_ms"])') ms"
			ml_stop "$RUN/d$i"
			qmp "$RUN/src/qmp.sock" cont >/dev/null
			sleep 2
		done
	done
done
limit=$(jget "$(qmp "$RUN/src/qmp.sock" query-migrate-parameters)" 'j["downtime-limit"]')

python3 - "$RUN" "$i" "$limit" <<'PY'
import json, statistics as st, sys
run, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs = {}
for i in range(1, n + 1):
    rate, mode = open(f"{run}/r{i}.what").read().split()
    j = json.load(open(f"{run}/r{i}.json"))
    wire = int(open(f"{run}/r{i}.wire").read())
    if mode == "pct":
        t = j["time"]
        row = dict(down=t["downtime_end_to_end_ms"], qemu=t["downtime_qemu_ms"], total=t["total_s"],
                   steps=j["downtime_steps"], line=j["timeline"], wire=wire)
    else:
        row = dict(down=j["downtime_end_to_end_ms"], qemu=j.get("downtime"),
                   total=j["total-time"] / 1e3, wire=wire)
    runs.setdefault(rate, {}).setdefault(mode, []).append(row)

def spread(xs):
    return f"median {st.median(xs):6.0f}  min {min(xs):6.0f}  max {max(xs):6.0f}"

print(f"\napache guest, 1 GiB RAM; downtime = source STOP to destination RESUME; downtime-limit {limit} ms")
for rate, modes in runs.items():
    print(f"\n== {rate}")
    for mode in ("stock", "pct"):
        rows = modes.get(mode, [])
        if not rows:
            continue
        d = [r["down"] for r in rows]
        q = [r["qemu"] for r in rows if r["qemu"] is not None]
        print(f"  {mode:5}  downtime ms {spread(d)}   runs {' '.join(f'{x:.0f}' for x in d)}")
        print(f"         as QEMU reports it: median {st.median(q):.0f} ms;  total {st.median([r['total'] for r in rows]):.1f} s;"
              f"  link {st.median([r['wire'] for r in rows]) / 1e6:.1f} MB")
    p, s = modes.get("pct"), modes.get("stock")
    if p and s:
        pm, sm = st.median([r["down"] for r in p]), st.median([r["down"] for r in s])
        tm = st.median([r["total"] for r in p]) / st.median([r["total"] for r in s])
        wm = st.median([r["wire"] for r in p]) / st.median([r["wire"] for r in s])
        print(f"  pct / stock: downtime {pm / sm:.2f}, total time {tm:.3f}, bytes {wm:.3f};"
              f"  pct median - limit = {pm - limit:+.0f} ms")
    if p:
        steps = {}
        for r in p:
            for x in r["steps"]:
                steps.setdefault(f"{x['from']}→{x['to']}", []).append(x["ms"])
        top = sorted(steps.items(), key=lambda kv: -st.median(kv[1]))[:5]
        print("  pct's longest steps (median ms): " + ", ".join(f"{k} {st.median(v):.0f}" for k, v in top))
PY
