#!/usr/bin/env bash
# A WAN-like link between two network namespaces: a veth pair shaped with tbf (no netem
# on these hosts, so bandwidth only, no added delay).
#
#   tools/netns.sh up NAME [RATE]   create NAME-a (10.77.0.1) and NAME-b (10.77.0.2),
#                                   each veth end shaped to RATE (default 50mbit)
#   tools/netns.sh rate NAME RATE   reshape both ends of an existing link to RATE
#   tools/netns.sh down NAME        delete both namespaces (and with them the veth pair)
#   tools/netns.sh bytes NAME a|b   bytes sent so far by that end (TX of its veth)
#
# Run a command inside one end with `ip netns exec NAME-a CMD`. Unix sockets, files and
# /dev/shm are shared with the host, so QMP sockets work across the namespaces.
# Needs root. `down` is idempotent; use it in an EXIT trap.
set -euo pipefail

cmd=${1:-}
name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || {
	sed -n '2,14p' "$0" >&2
	exit 2
}
a=$name-a b=$name-b
# Interface names are limited to 15 characters.
va=v${name: -8}a vb=v${name: -8}b

# shape NS DEV RATE [add|replace]: tbf at RATE, bursts of 64 KB, at most 100 ms of queue (a
# WAN router's buffer).
shape() {
	tc -n "$1" qdisc "${4:-add}" dev "$2" root tbf rate "$3" burst 64kb latency 100ms
}

case "$cmd" in
up)
	rate=${3:-50mbit}
	ip netns add "$a"
	ip netns add "$b"
	ip link add "$va" type veth peer name "$vb"
	ip link set "$va" netns "$a"
	ip link set "$vb" netns "$b"
	ip -n "$a" addr add 10.77.0.1/24 dev "$va"
	ip -n "$b" addr add 10.77.0.2/24 dev "$vb"
	for ns in "$a" "$b"; do
		ip -n "$ns" link set lo up
	done
	ip -n "$a" link set "$va" up
	ip -n "$b" link set "$vb" up
	shape "$a" "$va" "$rate"
	shape "$b" "$vb" "$rate"
	;;
rate)
	rate=${3:?RATE, e.g. 1gbit}
	shape "$a" "$va" "$rate" replace
	shape "$b" "$vb" "$rate" replace
	;;
down)
	ip netns del "$a" 2>/dev/null || true
	ip netns del "$b" 2>/dev/null || true
	;;
bytes)
	end=${3:?a or b}
	ns=$name-$end dev=v${name: -8}$end
	cat "/sys/class/net/$dev/statistics/tx_bytes" 2>/dev/null ||
		ip netns exec "$ns" cat "/sys/class/net/$dev/statistics/tx_bytes"
	;;
*)
	echo "netns.sh: unknown command '$cmd' (up, rate, down, bytes)" >&2
	exit 2
	;;
esac
