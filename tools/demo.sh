#!/usr/bin/env bash
# The main job: live-migrate the default lab guest (Debian 6.1 cloud kernel, `apache`
# workload: 1024 x 300 KB files read at boot, about 300 MB of page cache in 1 GiB of RAM)
# across a 50 Mbit/s link, once with pct and once with stock QEMU, and compare.
#
#   bash tools/demo.sh [RATE]        (default 50mbit)
#
# 1. two network namespaces joined by a veth pair shaped with tbf (tools/netns.sh);
# 2. the source guest boots in one, a destination QEMU (-incoming defer, on a copy of the
#    disk: the "mirrored" disk) waits in the other;
# 3. pct migrates it: `pct-migrate receive` feeds the destination, `pct-migrate` drives
#    the source; the guest resumes at the destination and re-checks its files;
# 4. stock QEMU migrates the same guest back over the same link (TCP, default settings);
#    the guest resumes at the source end and re-checks its files again;
# 5. both migrations side by side: bytes on the link, total time, downtime.
#
# PCT_QEMU=backports (QEMU 10.0) picks the source end's QEMU, PCT_QEMU_DST the destination
# end's (default: PCT_QEMU; both default to the system's QEMU 7.2).
#
# Installs what it needs on a fresh machine (run as root), caches downloads, and always
# stops every QEMU and pct process, removes RAM files and deletes the namespaces on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-50mbit}
# As a user runs it: no --profile. pct takes a shipped or cached profile with the guest's
# build-id, or builds one from the guest's memory (and says which).
PROFILE=${PROFILE:-auto}
source tools/migrate-lib.sh
echo "== building pct"
ml_start demo "$rate"
echo "== link: namespaces $NS-a (10.77.0.1) and $NS-b (10.77.0.2), veth shaped to $rate"

echo "== booting the source guest (apache workload) in $NS-a"
ml_apache_source "$RUN/src" "pct-demo-src-$$" "$RUN/dst.img"
python3 tools/lab/oracle-summary.py "$RUN/src/oracle.img" 2>/dev/null | head -4 || true
ml_guest b "$RUN/dst" "pct-demo-dst-$$" --workload apache --disk "$RUN/dst.img" --incoming

echo "== what pct sees in the guest (pct-migrate --dry-run)"
mapfile -t profile_args < <(ml_profile_args)
"$PCT" "${profile_args[@]}" --qmp "$RUN/src/qmp.sock" --dry-run | sed -n '/predicted/,$p'

echo "== migration 1: pct, $NS-a -> $NS-b"
ml_pct "$RUN/src" "$RUN/dst" "$RUN/dst.img" "$RUN/pct"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"])' "$RUN/pct.json" >/dev/null
echo -n "guest at the destination: "
ml_verify "$RUN/dst"
ml_stop "$RUN/src"

echo "== migration 2: stock QEMU (TCP, default capabilities), $NS-b -> $NS-a"
ml_guest a "$RUN/back" "pct-demo-back-$$" --workload apache --disk "$RUN/src/disk.img" --incoming
ml_stock "$RUN/dst" b "$RUN/back" 10.77.0.1:7401 "$RUN/stock"
echo -n "guest back at the source end: "
ml_verify "$RUN/back"

echo
python3 - "$RUN" "$rate" "$(ml_qemu_version b)" <<'PY'
import json, sys
run, rate, qemu = sys.argv[1], sys.argv[2], sys.argv[3]
p = json.load(open(f"{run}/pct.json"))
s = json.load(open(f"{run}/stock.json"))
pw = int(open(f"{run}/pct.wire").read())
sw = int(open(f"{run}/stock.wire").read())
# QEMU's own total-time, or, where QEMU reports 0 (it does in this script's stock run, for a
# reason not found yet), pct's clock from `migrate` to the poll that saw it complete.
pt, st = p["time"]["total_s"], (s.get("total-time") or 0) / 1e3 or s.get("elapsed_s", float("nan"))
ratio = lambda a, b: a / b if b else float("nan")
pd = p["time"].get("downtime_end_to_end_ms") or float("nan")
sd = s.get("downtime_end_to_end_ms", float("nan"))
print(f"apache guest, 1 GiB RAM, over {rate} (tbf on veth between two namespaces)")
print(f"{'':26}{'stock QEMU ' + qemu:>18}{'pct':>14}{'pct / stock':>14}")
print(f"{'bytes on the link (MB)':28}{sw/1e6:16.1f}{pw/1e6:14.1f}{ratio(pw, sw):14.3f}")
print(f"{'total time (s)':28}{st:16.1f}{pt:14.1f}{ratio(pt, st):14.3f}")
print(f"{'downtime (ms)':28}{sd:16.0f}{pd:14.0f}{ratio(pd, sd):14.3f}   (source STOP to destination RESUME)")
print(f"{'  as QEMU reports it':28}{s.get('downtime', 0):16.0f}{p['time']['downtime_qemu_ms'] or 0:14.0f}")
steps = p.get("downtime_steps") or []
if steps:
    print(f"{'  pct, longest steps':28}" + ", ".join(f"{x['from']}→{x['to']} {x['ms']:.0f}" for x in steps[:3]))
pg = p["pages"]
print(f"\npct: QEMU's stream {p['stream_bytes']/1e6:.1f} MB; {pg['teleported']} pages teleported "
      f"({pg['verified']} verified, {pg['fallen_back']} fallen back), {pg['sent']} sent, {pg['zero']} zero;")
print(f"     {p['reference_bytes_per_page']:.2f} bytes per teleported page, data compressed "
      f"{p['compression_ratio']:.2f}:1, cache map taken in {p['time']['scan_s']:.2f} s")
c = p.get("switchover_check")
if c:
    print(f"     switchover check: {c['pages_checked']} pages compared with the stopped guest in "
          f"{c.get('hash_time', c['time']):.0f} ms ({c['time']:.0f} ms of it after the EOS), {c['pages_resent']} re-sent (writes QEMU's dirty tracking missed)")
PY
