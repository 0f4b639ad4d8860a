#!/usr/bin/env bash
# The paper's evaluation, reproduced on lab guests: bytes on the link, total time, downtime,
# restore time, pages teleported and elided, for five configurations side by side, over a
# tbf-shaped link between two network namespaces; then the guest's file-read throughput
# second by second across a pct migration and across drop_caches + stock QEMU.
#
#   bash tools/bench-paper.sh [--cells LIST] [--configs LIST] [--runs N] [--no-readrate]
#                             [--out DIR]
#
#   --cells    workload@Mbit pairs (default: apache@50,apache@100,apache@1000,db@50,
#              idle@50,aged@50)
#   --configs  any of (default: all, in this order)
#                stock     stock QEMU over TCP, default settings
#                drop      stock QEMU after `echo 3 > drop_caches` in the guest
#                raw       pct, no teleportation, no compression, no free-page elision
#                          (pct's own overhead as a relay)
#                pct       pct, teleportation and zstd, no free-page elision
#                pct-free  pct as it runs by default: also free-page elision
#   --runs     migrations per configuration and cell (default 3)
#   --no-readrate  skip the read-throughput figure
#   --out      results directory (default bench/results/paper-UTCDATE)
#
# Each run of a cell boots a fresh guest and migrates it back and forth between the two
# namespaces, once per configuration, in the order above (free-page elision, which leaves
# the guest's free pages zero, last); after `drop` the guest reads again what its workload
# read as it started, so the next configuration finds the page cache as warm as before.
# Both ends use the same disk image file, the ideal of a destination disk kept in sync.
# The full run took 78 minutes on a 2-core TCG host (each migration that sends the page
# cache is capped at PCT_BENCH_STOCK_TIMEOUT, 180 s). Writes DIR/runs.jsonl (one line per
# migration), DIR/tables.md,
# DIR/*.png (tools/bench-paper-report.py), DIR/machine.txt and DIR/command.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="bash tools/bench-paper.sh $*"
cells=apache@50,apache@100,apache@1000,db@50,idle@50,aged@50
configs=stock,drop,raw,pct,pct-free
runs=3 readrate=1 out=
while [ $# -gt 0 ]; do
	case $1 in
	--cells) cells=$2; shift 2 ;;
	--configs) configs=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--no-readrate) readrate=; shift ;;
	--out) out=$2; shift 2 ;;
	*) sed -n '2,20p' "$0" >&2; exit 2 ;;
	esac
done
for c in ${configs//,/ }; do
	case $c in stock | drop | raw | pct | pct-free) ;; *) echo "unknown configuration $c" >&2; exit 2 ;; esac
done
for c in ${cells//,/ }; do
	[[ $c =~ ^(apache|db|idle|aged)@[0-9]+$ ]] || { echo "bad cell $c (workload@Mbit)" >&2; exit 2; }
done

source tools/migrate-lib.sh
ml_start paper 50mbit
out=${out:-bench/results/paper-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
: >"$out/runs.jsonl"
echo "$cmdline" >"$out/command.txt"
{
	echo "date: $(date -u +%FT%TZ)"
	echo "pct: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tools || echo ' (uncommitted changes)')"
	echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r)"
	echo "qemu: $(qemu-system-x86_64 --version | head -1), accel tcg"
	echo "guest: $(jget "$PROFILE" 'j["kernel"]["release"]'), 1 GiB RAM, 1 vCPU"
	echo "link: tbf on a veth pair between two network namespaces (burst 64 kB, 100 ms queue)"
} >"$out/machine.txt"
cat "$out/machine.txt"

n=0
# A migration that sends the page cache (stock, drop, raw) and has not converged after this
# long (a guest dirtying memory faster than the link drains it, with QEMU's default 300 ms
# downtime limit) is cancelled and recorded as such; the guest stays on the source. 180 s
# keeps the whole run within 90 minutes on a 2-core TCG host, where the db guest at
# 50 Mbit/s is at the edge of convergence.
stock_timeout=${PCT_BENCH_STOCK_TIMEOUT:-180}
# migrate CONFIG FROM-DIR FROM-END TO-DIR DISK OUT: one migration; returns 1 when a
# migration did not converge (OUT.json then says so).
migrate() {
	local config=$1 from=$2 end=$3 to=$4 disk=$5 o=$6 other
	if [ "$end" = a ]; then other=b; else other=a; fi
	case $config in
	stock | drop)
		[ "$config" = drop ] && ml_command "$from" drop '^PCT-DROPPED' >/dev/null
		if ! ml_stock "$from" "$end" "$to" "$(ml_addr "$other"):$((7401 + n % 50))" "$o" --timeout-s "$stock_timeout"; then
			qmp "$from/qmp.sock" migrate_cancel >/dev/null
			echo "{\"converged\": false, \"timeout_s\": $stock_timeout}" >"$o.json"
			return 1
		fi
		;;
	raw)
		local rc=0
		ML_PCT_TIMEOUT=$stock_timeout ML_FROM=$end ml_pct "$from" "$to" "$disk" "$o" --no-teleport --no-compress --no-free-elision || rc=$?
		if [ "$rc" -eq 2 ]; then
			echo "{\"converged\": false, \"timeout_s\": $stock_timeout}" >"$o.json"
			return 1
		fi
		return "$rc"
		;;
	pct) ML_FROM=$end ml_pct "$from" "$to" "$disk" "$o" --no-free-elision ;;
	pct-free) ML_FROM=$end ml_pct "$from" "$to" "$disk" "$o" ;;
	esac
}

# record WORKLOAD MBIT CONFIG RUN OUT: one line of runs.jsonl from the migration's reports.
record() {
	python3 - "$@" >>"$out/runs.jsonl" <<'PY'
import json, sys
w, mbit, config, run, o = sys.argv[1:]
j = json.load(open(o + ".json"))
rec = {"workload": w, "mbit": int(mbit), "config": config, "run": int(run)}
if j.get("converged") is False:
    rec.update(converged=False, timeout_s=j["timeout_s"])
    print(json.dumps(rec))
    sys.exit(0)
rec["wire_bytes"] = int(open(o + ".wire").read())
if config in ("stock", "drop"):
    t = j.get("total-time") or 0
    rec.update(total_s=t / 1e3 if t else j["elapsed_s"],
               downtime_ms=j.get("downtime_end_to_end_ms"), restore_s=0.0,
               stream_bytes=j["ram"]["transferred"], teleported=0, elided=0, fallen_back=0)
else:
    t = j["time"]
    rec.update(total_s=t["total_s"], downtime_ms=t["downtime_end_to_end_ms"],
               restore_s=t.get("restore_s") or 0.0, stream_bytes=j["stream_bytes"],
               teleported=j["pages"]["teleported"], elided=j["pages"]["elided"],
               fallen_back=j["pages"]["fallen_back"], scan_s=t.get("scan_s"))
print(json.dumps(rec))
PY
}

for cell in ${cells//,/ }; do
	w=${cell%@*} mbit=${cell#*@}
	bash tools/netns.sh rate "$NS" "${mbit}mbit"
	for r in $(seq 1 "$runs"); do
		# A fresh guest (and disk) for every run: a migration with free-page elision
		# leaves the guest's free pages zero, and the next run must find them stale again.
		echo "== $w at $mbit Mbit/s, run $r: booting"
		n=$((n + 1))
		cur=$RUN/$w-$mbit-$n end=a
		ml_guest a "$cur" "pct-paper-$$-$n" --workload "$w"
		ml_wait_serial "$cur" PCT-READY 600
		ml_command "$cur" sync '^PCT-SYNCED' >/dev/null
		disk=$cur/disk.img first=$cur
		for config in ${configs//,/ }; do
			n=$((n + 1))
			if [ "$end" = a ]; then next=b; else next=a; fi
			dst=$RUN/$w-$mbit-$n
			ml_guest "$next" "$dst" "pct-paper-$$-$n" --workload "$w" --disk "$disk" --incoming
			o=$out/$w-$mbit-$config-$r
			if migrate "$config" "$cur" "$end" "$dst" "$disk" "$o"; then
				ml_stop "$cur"
				[ "$cur" = "$first" ] || rm -rf "$cur"
				cur=$dst end=$next
			else
				echo "$w at $mbit Mbit/s: $config did not converge in $stock_timeout s; cancelled" >&2
				ml_stop "$dst"
				rm -rf "$dst"
			fi
			record "$w" "$mbit" "$config" "$r" "$o"
			tail -1 "$out/runs.jsonl"
			# After drop_caches the guest reads again what its workload reads.
			if [ "$config" = drop ]; then
				ml_command "$cur" warm '^PCT-WARM' 600 >/dev/null
			fi
		done
		v=$(ml_verify "$cur")
		echo "== $w at $mbit Mbit/s, run $r: guest after $(echo "${configs//,/ }" | wc -w) migrations: $v"
		[ "$v" = PCT-VERIFY-OK ] || exit 1
		ml_stop "$cur"
		rm -rf "$cur" "$first"
	done
done

if [ -n "$readrate" ]; then
	# The apache guest reads its files in a loop and prints its read rate each second;
	# every serial line is stamped with the host's clock as it arrives.
	echo "== read throughput: apache at 50 Mbit/s, pct, then drop_caches + stock QEMU"
	bash tools/netns.sh rate "$NS" 50mbit
	g0=$RUN/rr-0 g1=$RUN/rr-1 g2=$RUN/rr-2
	rr=$out/readrate
	: >"$rr.marks"
	: >"$rr.log"
	ml_guest a "$g0" "pct-paper-$$-rr0" --workload apache
	ml_wait_serial "$g0" PCT-READY 600
	ml_command "$g0" sync '^PCT-SYNCED' >/dev/null
	python3 -u - "$rr.log" "$g0/serial.log" "$g1/serial.log" "$g2/serial.log" <<'PY' &
import os, sys, time
out, files = open(sys.argv[1], "a"), sys.argv[2:]
pos = {f: os.path.getsize(f) if os.path.exists(f) else 0 for f in files}
rest = {f: b"" for f in files}
while True:
    for f in files:
        try:
            if os.path.getsize(f) < pos[f]:
                pos[f], rest[f] = 0, b""
            with open(f, "rb") as h:
                h.seek(pos[f])
                data = h.read()
        except FileNotFoundError:
            continue
        pos[f] += len(data)
        *lines, rest[f] = (rest[f] + data).split(b"\n")
        for line in lines:
            if line.startswith(b"PCT-READRATE"):
                out.write(f"{time.time():.3f} {line.decode(errors='replace').strip()}\n")
                out.flush()
    time.sleep(0.05)
PY
	ML_PIDS+=($!)
	mark() { printf '%s %s\n' "$1" "$EPOCHREALTIME" >>"$rr.marks"; }
	mark start
	ml_command "$g0" readrate '^PCT-READING' >/dev/null
	sleep 20
	ml_guest b "$g1" "pct-paper-$$-rr1" --workload apache --disk "$g0/disk.img" --incoming
	mark pct-begin
	ml_pct "$g0" "$g1" "$g0/disk.img" "$rr-pct"
	mark pct-end
	ml_stop "$g0"
	sleep 30
	ml_guest a "$g2" "pct-paper-$$-rr2" --workload apache --disk "$g0/disk.img" --incoming
	mark drop-begin
	ml_command "$g1" drop '^PCT-DROPPED' >/dev/null
	ml_stock "$g1" b "$g2" "$(ml_addr a):7399" "$rr-stock"
	mark drop-end
	ml_stop "$g1"
	sleep 40
	mark end
fi

python3 -c 'import matplotlib' 2>/dev/null ||
	python3 -m pip install -q --disable-pip-version-check matplotlib ||
	echo "matplotlib could not be installed: tables only" >&2
python3 tools/bench-paper-report.py "$out"
