#!/usr/bin/env bash
# What TLS costs pct (figures, not pass/fail): a QEMU stream replayed through the real pct
# sender and receiver on loopback, no QEMU, so nothing else limits the rate
# (`pct-migrate bench-link`, src/migrate/replay.rs). Four configurations: zstd off and on,
# each over plain TCP and over TLS 1.3; prints pct's relay throughput in MB/s of QEMU
# stream (best and median of RUNS) and TLS's ratio to plain TCP. No teleportation (there is
# no guest): every page is relayed, as with --no-teleport.
#
#   bash tools/bench-tls.sh [STREAM]      (default: synthetic streams of 512 MB, mixed
#                                          pages then random pages; about a minute)
#
# STREAM: a stream kept with `pct-migrate --record-stream FILE`. RUNS=5 by default; the
# JSON of each run goes to target/bench-tls*.json. Sender, receiver and both TLS pumps
# share this machine's cores: on a 2-core machine, every figure is for both ends at once.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
cargo build --release --quiet --bin pct-migrate
pct=target/release/pct-migrate
echo "== $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${1:-}" ]; then
	"$pct" bench-link --stream "$1" --runs "$runs" --json >target/bench-tls.json
else
	for content in mixed random; do
		"$pct" bench-link --mb 512 --content "$content" --runs "$runs" --json >"target/bench-tls-$content.json"
	done
fi
