#!/usr/bin/env bash
# pct-migrate benchmarks (figures, not pass/fail): the apache guest (1 GiB RAM, ~300 MB of
# page cache) over a shaped link between two network namespaces, three migrations of the
# same guest in a row:
#
#   1. pct (teleportation on, zstd)                   namespace a -> b
#   2. stock QEMU 7.2 over TCP, default settings      b -> a
#   3. pct with --no-teleport --no-compress           a -> b   (pct's own overhead)
#
# then the receiver's restore rate from a page-cached disk image (`pct-migrate
# bench-restore`). Prints every figure next to its goal (issue 5).
#
#   bash tools/bench-migrate.sh [RATE]      (default 50mbit; about 4 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-50mbit}
source tools/migrate-lib.sh
ml_start bench "$rate"

echo "== booting the apache guest"
ml_apache_source "$RUN/g1" "pct-bench-1-$$" "$RUN/b.img"
ml_guest b "$RUN/g2" "pct-bench-2-$$" --workload apache --disk "$RUN/b.img" --incoming

echo "== 1/3 pct, teleportation on ($rate)"
ml_pct "$RUN/g1" "$RUN/g2" "$RUN/b.img" "$RUN/pct"
ml_stop "$RUN/g1"

echo "== 2/3 stock QEMU ($rate)"
ml_guest a "$RUN/g3" "pct-bench-3-$$" --workload apache --disk "$RUN/g1/disk.img" --incoming
ml_stock "$RUN/g2" b "$RUN/g3" 10.77.0.1:7401 "$RUN/stock"
ml_stop "$RUN/g2"

echo "== 3/3 pct, --no-teleport --no-compress ($rate)"
ml_guest b "$RUN/g4" "pct-bench-4-$$" --workload apache --disk "$RUN/b.img" --incoming
ml_pct "$RUN/g3" "$RUN/g4" "$RUN/b.img" "$RUN/raw" --no-teleport --no-compress
echo -n "guest after three migrations: "
ml_verify "$RUN/g4"

echo "== receiver restore rate (disk image page-cached)"
cat "$RUN/b.img" >/dev/null
"$PCT" bench-restore --disk "$RUN/b.img" --pages 76800 | tee "$RUN/restore.txt"

python3 - "$RUN" "$rate" <<'PY'
import json, re, sys
run, rate = sys.argv[1], sys.argv[2]
p = json.load(open(f"{run}/pct.json"))
r = json.load(open(f"{run}/raw.json"))
s = json.load(open(f"{run}/stock.json"))
w = lambda n: int(open(f"{run}/{n}.wire").read())
pw, rw, sw = w("pct"), w("raw"), w("stock")
st = s["total-time"] / 1e3
rr = float(re.search(r"([0-9.]+) MB/s", open(f"{run}/restore.txt").read()).group(1))
print(f"\napache guest, 1 GiB RAM, link {rate} (tbf on veth between two namespaces)")
print(f"{'':40}{'figure':>14}{'goal':>12}")
def row(name, val, goal):
    print(f"{name:40}{val:>14}{goal:>12}")
row("stock QEMU: bytes on the link", f"{sw/1e6:.1f} MB", "")
row("stock QEMU: total time", f"{st:.1f} s", "")
row("stock QEMU: downtime (STOP->RESUME)", f"{s.get('downtime_end_to_end_ms', float('nan')):.0f} ms", "")
row("pct: bytes on the link", f"{pw/1e6:.1f} MB", "")
row("pct: bytes / stock", f"{pw/sw:.3f} x", "<= 0.10")
row("pct: total time", f"{p['time']['total_s']:.1f} s", "")
row("pct: time / stock", f"{p['time']['total_s']/st:.3f} x", "<= 0.2")
row("pct: downtime (STOP->RESUME)", f"{p['time']['downtime_end_to_end_ms']:.0f} ms", "")
row("pct: reference bytes / teleported page", f"{p['reference_bytes_per_page']:.2f} B", "<= 4")
row("pct: pages teleported / fallen back", f"{p['pages']['teleported']} / {p['pages']['fallen_back']}", "")
c = p.get("switchover_check")
if c:
    row("pct: switchover check (in the downtime)", f"{c['time']:.0f} ms", "")
    row("   pages re-sent (missed by QEMU)", f"{c['pages_resent']}", "")
row("pct, no teleport, no zstd: bytes / stock", f"{rw/sw:.4f} x", "<= 1.02")
row("   (on the wire / its own QEMU stream)", f"{r['wire']['total']/r['stream_bytes']:.4f} x", "")
row("pct, no teleport, no zstd: time / stock", f"{r['time']['total_s']/st:.3f} x", "")
row("receiver restore rate (page-cached)", f"{rr/1e3:.2f} GB/s", ">= 1")
PY
