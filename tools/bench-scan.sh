#!/usr/bin/env bash
# Benchmark (not a test): pct's page-cache walk and whole `scan` process on the 1 GiB
# `apache` lab guest (1024 x 300 KB files cached), beside drgn walking the same guest's
# page cache from an ELF core of the same moment.
#
#   bash tools/bench-scan.sh [RUNS]      (default 7 runs each; prints medians)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
bash tools/lab/ensure-host.sh
kdir=$(bash tools/lab/fetch-kernel.sh cloud-amd64 | tail -1)
profile=$(bash tools/lab/lab-profile.sh cloud-amd64)
python3 -c 'import drgn' 2>/dev/null || python3 -m pip install -q drgn
cargo build --release --quiet --bin pct-introspect --bin pct-migrate
pct=target/release/pct-introspect

run=$(mktemp -d /tmp/pct-bench.XXXXXX)
qemu_pid=
cleanup() {
	[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null || true
	[ -f "$run/ram.path" ] && rm -f "$(cat "$run/ram.path")"
	rm -rf "$run"
}
trap cleanup EXIT INT TERM

bash tools/lab/run-guest.sh --dir "$run" --workload apache --name "pct-bench-$$" >"$run/qemu.log" 2>&1 &
qemu_pid=$!
until grep -q PCT-READY "$run/serial.log" 2>/dev/null; do
	kill -0 "$qemu_pid" 2>/dev/null || { cat "$run/qemu.log"; exit 1; }
	sleep 0.2
done
pctm=target/release/pct-migrate
"$pctm" qmp "$run/qmp.sock" stop >/dev/null
"$pctm" qmp "$run/qmp.sock" dump-guest-memory "{\"paging\": false, \"protocol\": \"file:$run/core.elf\"}" >/dev/null
ram=$(cat "$run/ram.path")

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
: >"$run/pct.t"; : >"$run/walk.t"; : >"$run/rss.t"; : >"$run/drgn.t"
for i in $(seq "$runs"); do
	/usr/bin/time -f "%e" -o "$run/t" "$pct" scan --profile "$profile" --memory "$ram" --format json >"$run/r.json"
	cat "$run/t" >>"$run/pct.t"
	python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["timings_ms"]["walk"]); print(r["rss_anon_kib"], file=sys.stderr)' "$run/r.json" >>"$run/walk.t" 2>>"$run/rss.t"
	/usr/bin/time -f "%e" -o "$run/t" python3 tools/drgn-pagecache.py "$run/core.elf" "$kdir/vmlinux" vda >"$run/drgn.out"
	cat "$run/t" >>"$run/drgn.t"
done
pages=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["page_cache"].get("clean",0)//4096, r["restorable_bytes"]//4096)' "$run/r.json")
drgn_pages=$(wc -l <"$run/drgn.out")
p=$(median <"$run/pct.t"); w=$(median <"$run/walk.t"); d=$(median <"$run/drgn.t"); rss=$(median <"$run/rss.t")
echo "apache guest, 1 GiB RAM; clean/restorable pages found by pct: $pages; pages drgn lists on vda: $drgn_pages"
echo "pct walk (median of $runs):              ${w} ms   (goal <= 50 ms)"
echo "pct scan, whole process (median):      ${p} s    (goal <= 0.2 s)"
echo "pct anonymous memory at end of scan:   ${rss} KiB (goal < 64 MiB)"
echo "drgn page-cache walk, whole process:   ${d} s"
python3 -c "print(f'drgn / pct whole-process ratio:        {float(\"$d\")/max(float(\"$p\"),1e-3):.1f}x')"
