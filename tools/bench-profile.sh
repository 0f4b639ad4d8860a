#!/usr/bin/env bash
# Benchmark `pct-introspect build-profile` on the Debian 6.1 cloud vmlinux (590 MB):
# wall time and peak RSS with DWARF and with BTF. Not a test: prints figures.
#
#   tools/bench-profile.sh [VMLINUX] [RUNS]      (default: the lab's cloud-amd64 kernel, 3 runs)
#
# Goals (issue 3): DWARF ≤ 3 s and ≤ 1 GiB peak RSS; BTF ≤ 0.3 s. The vmlinux is read
# once first so every run sees a warm page cache (the first cold read is I/O-bound).
set -euo pipefail
cd "$(dirname "$0")/.."

vmlinux=${1:-}
runs=${2:-3}
if [ -z "$vmlinux" ]; then
	vmlinux="$(bash tools/lab/fetch-kernel.sh cloud-amd64)/vmlinux"
fi
[ -r "$vmlinux" ] || { echo "bench-profile: cannot read $vmlinux" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench-profile: needs GNU time (/usr/bin/time, Debian package 'time')" >&2; exit 1; }

cargo build --release --quiet --bin pct-introspect
bin=target/release/pct-introspect
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cat "$vmlinux" >/dev/null # warm the page cache
echo "vmlinux: $vmlinux ($(stat -c %s "$vmlinux") bytes), $(nproc) CPUs, $runs runs each"
printf '%-6s %10s %10s %12s\n' method best_s median_s peak_rss_MiB
for method in dwarf btf; do
	times=()
	rss=0
	for _ in $(seq "$runs"); do
		/usr/bin/time -f '%e %M' -o "$out/t" "$bin" build-profile "$vmlinux" --method "$method" -o "$out/p.json" 2>/dev/null
		read -r t m <"$out/t"
		times+=("$t")
		[ "$m" -gt "$rss" ] && rss=$m
	done
	sorted=$(printf '%s\n' "${times[@]}" | sort -n)
	best=$(echo "$sorted" | head -1)
	median=$(echo "$sorted" | sed -n "$(((runs + 1) / 2))p")
	printf '%-6s %10s %10s %12.1f\n' "$method" "$best" "$median" "$(echo "$rss / 1024" | bc -l)"
done
echo "goals: dwarf <= 3 s and <= 1024 MiB; btf <= 0.3 s"
