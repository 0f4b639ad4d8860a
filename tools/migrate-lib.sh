# Shared by tools/demo.sh and tools/bench-migrate.sh (source it): lab guests inside two
# network namespaces joined by a shaped link (tools/netns.sh), migrations with pct and with
# stock QEMU across it, and cleanup of everything on exit.
#
# The caller calls ml_start TAG [RATE] (or sets RUN, a scratch directory, and NS, a short
# name for the namespace pair, then calls ml_setup RATE). Everything started here is
# stopped by ml_cleanup (an EXIT trap).

ML_PIDS=()
ML_RAMS=()
PCT=${PCT:-target/release/pct-migrate}
# The guest kernel's profile: set by ml_start to the lab's (tools/lab/lab-profile.sh) unless
# given; `auto` passes no --profile, so pct picks or builds one itself (ml_profile_args).
PROFILE=${PROFILE:-}

ml_cleanup() {
	local p
	for p in "${ML_PIDS[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	for p in "${ML_PIDS[@]}"; do
		wait "$p" 2>/dev/null || true
	done
	for p in "${ML_RAMS[@]}"; do
		rm -f "$p"
	done
	[ -n "${NS:-}" ] && bash tools/netns.sh down "$NS"
	[ -n "${RUN:-}" ] && [ -z "${PCT_KEEP_LAB:-}" ] && rm -rf "$RUN"
	return 0
}

ml_setup() {
	trap ml_cleanup EXIT
	trap 'exit 130' INT TERM
	bash tools/netns.sh down "$NS"
	bash tools/netns.sh up "$NS" "$1"
}

# ml_start TAG [RATE]: the lab ready (host packages, the guest kernel and its profile in
# PROFILE, pct-migrate built), a scratch directory in RUN (/tmp/pct-TAG.*), everything cleaned
# up on exit; with RATE, also the two namespaces NS-a and NS-b joined by a link shaped to RATE.
# ml_profile_args: the --profile arguments for pct-migrate (none for PROFILE=auto).
ml_profile_args() {
	[ "$PROFILE" = auto ] || printf '%s\n' --profile "$PROFILE"
}

# ml_link_args END: how end a or b of ml_pct protects its link. By default the lab's link
# is plaintext (--insecure-plaintext: the lab's own namespaces); ML_TLS=1 gives both ends
# certificates of one CA (pct-migrate keygen in RUN/pki) and TLS.
ml_link_args() {
	if [ "${ML_TLS:-0}" = 1 ]; then
		[ -d "$RUN/pki/10.77.0.1" ] || "$PCT" keygen --out "$RUN/pki" 10.77.0.1 10.77.0.2 >/dev/null
		printf '%s\n' --tls-dir "$RUN/pki/$(ml_addr "$1")"
	else
		printf '%s\n' --insecure-plaintext
	fi
}

# ml_qemu_prefix CHOICE: the prefix of the QEMU a choice names (tools/lab/common.sh).
ml_qemu_prefix() {
	bash -c 'source tools/lab/common.sh; qemu_prefix_of "$1"' _ "$1"
}

# ml_qemu_version END: the version of end a's or end b's QEMU (e.g. 7.2.23).
ml_qemu_version() {
	local prefix=$ML_QEMU_A bin=qemu-system-x86_64
	[ "$1" = b ] && prefix=$ML_QEMU_B
	[ -n "$prefix" ] && bin=$prefix/usr/bin/qemu-system-x86_64
	"$bin" --version | awk 'NR == 1 {sub(/\(.*/, "", $4); print $4}'
}

# ml_reap: removes what an earlier run left behind when it was killed (SIGKILL skips its
# EXIT trap): guest RAM files /dev/shm/pct-*-PID and namespace pairs pXPID-a/b whose PID is
# gone, unless a process still maps the file or runs in the namespace.
ml_reap() {
	local f ns pid
	for f in /dev/shm/pct-*-[0-9]*; do
		[ -e "$f" ] || continue
		pid=${f##*-}
		[[ $pid =~ ^[0-9]+$ ]] || continue
		kill -0 "$pid" 2>/dev/null && continue
		grep -qsF -- "$f" /proc/[0-9]*/maps && continue
		echo "ml_reap: removing $f, left by process $pid, which is gone" >&2
		rm -f -- "$f"
	done
	for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
		[[ $ns =~ ^p[a-z]([0-9]+)-a$ ]] || continue
		pid=${BASH_REMATCH[1]}
		kill -0 "$pid" 2>/dev/null && continue
		[ -z "$(ip netns pids "$ns" 2>/dev/null)" ] || continue
		[ -z "$(ip netns pids "${ns%-a}-b" 2>/dev/null)" ] || continue
		echo "ml_reap: removing namespaces ${ns%-a}-a/b, left by process $pid, which is gone" >&2
		bash tools/netns.sh down "${ns%-a}"
	done
}

ml_start() {
	bash tools/lab/ensure-host.sh
	ml_reap
	# The kernel is fetched here, outside the namespaces: inside them there is no network.
	bash tools/lab/fetch-kernel.sh cloud-amd64 >/dev/null
	[ -n "$PROFILE" ] || PROFILE=$(bash tools/lab/lab-profile.sh cloud-amd64)
	# Each end's QEMU, resolved (and fetched) here, where the network is.
	ML_QEMU_A=$(ml_qemu_prefix "${PCT_QEMU:-}")
	ML_QEMU_B=$(ml_qemu_prefix "${PCT_QEMU_DST:-${PCT_QEMU:-}}")
	cargo build --release --quiet --bin pct-migrate
	RUN=$(mktemp -d "/tmp/pct-$1.XXXXXX")
	if [ -n "${2:-}" ]; then
		NS=p${1:0:1}$$
		ml_setup "$2"
	else
		trap ml_cleanup EXIT
		trap 'exit 130' INT TERM
	fi
}

# qmp SOCK COMMAND [ARGUMENTS-JSON]: prints the command's return value as JSON.
qmp() {
	"$PCT" qmp "$@"
}

# jget JSON-FILE-OR-STRING PYTHON-EXPR (on `j`): prints the value.
jget() {
	python3 -c 'import json,sys; s=sys.argv[1]; j=json.load(open(s)) if not s.lstrip().startswith("{") else json.loads(s); print(eval(sys.argv[2]))' "$1" "$2"
}

# ml_guest END DIR NAME ARGS...: starts a lab guest inside namespace $NS-END, on end a's
# QEMU (PCT_QEMU) or end b's (PCT_QEMU_DST, default PCT_QEMU), as ml_start resolved them.
ml_guest() {
	local end=$1 dir=$2 name=$3 qemu
	shift 3
	mkdir -p "$dir"
	qemu=$ML_QEMU_A
	[ "$end" = b ] && qemu=$ML_QEMU_B
	ip netns exec "$NS-$end" bash tools/lab/run-guest.sh --dir "$dir" --name "$name" --qemu "${qemu:-system}" "$@" >"$dir/run.log" 2>&1 &
	ML_PIDS+=($!)
	ML_RAMS+=("/dev/shm/$name")
	echo $! >"$dir/runner.pid"
	local t=0
	until [ -S "$dir/qmp.sock" ]; do
		kill -0 "$(cat "$dir/runner.pid")" 2>/dev/null || {
			tail -20 "$dir/run.log" >&2
			echo "the guest in $dir did not start" >&2
			return 1
		}
		sleep 0.1
		t=$((t + 1))
	done
}

# ml_apache_source DIR NAME COPY: boots the apache guest in namespace a, waits until it is
# ready, and copies its disk to COPY (the destination's mirrored disk).
ml_apache_source() {
	ml_guest a "$1" "$2" --workload apache
	ml_wait_serial "$1" PCT-READY
	cp --sparse=always "$1/disk.img" "$3"
}

# ml_stop DIR: stops the guest of DIR and removes its RAM file.
ml_stop() {
	local pid
	pid=$(cat "$1/runner.pid")
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	rm -f "$(cat "$1/ram.path" 2>/dev/null)"
}

# ml_wait_serial DIR MARKER [TIMEOUT-S]: waits for a serial line starting with MARKER.
ml_wait_serial() {
	local dir=$1 marker=$2 timeout=${3:-300} start=$SECONDS
	until grep -q "^$marker" "$dir/serial.log" 2>/dev/null; do
		[ $((SECONDS - start)) -lt "$timeout" ] || {
			echo "no $marker from the guest in $dir within $timeout s" >&2
			return 1
		}
		sleep 0.2
	done
}

# ml_command DIR COMMAND ANSWER-REGEX [TIMEOUT-S]: writes COMMAND to the guest's console
# and prints the first line matching ANSWER-REGEX that the guest printed after it. The
# connection stays open a while: QEMU hands the bytes to the guest's UART as it drains
# them, and drops what is left when the client hangs up.
ml_command() {
	local dir=$1 cmd=$2 answer=$3 timeout=${4:-180} before start line
	before=$(wc -c <"$dir/serial.log")
	python3 -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode() + b"\n"); time.sleep(3); s.close()' "$dir/serial.sock" "$cmd" &
	start=$SECONDS
	while [ $((SECONDS - start)) -lt "$timeout" ]; do
		line=$(tail -c +"$((before + 1))" "$dir/serial.log" | grep -a -m1 -E "$answer" | tr -d '\r' || true)
		if [ -n "$line" ]; then
			echo "$line"
			return 0
		fi
		sleep 0.5
	done
	echo "no answer to '$cmd' from the guest in $dir within $timeout s" >&2
	return 1
}

# ml_verify DIR: the guest re-reads its files and checks them; prints its answer.
ml_verify() {
	ml_command "$1" verify '^PCT-VERIFY-(OK|FAIL)'
}

# ml_addr END: the address of end a or b on the link.
ml_addr() {
	case $1 in a) echo 10.77.0.1 ;; b) echo 10.77.0.2 ;; esac
}

# ml_pct SRC_DIR DST_DIR DST_DISK OUT [SENDER-FLAGS...]: migrates with pct from end a to
# end b (from b to a with ML_FROM=b); writes OUT.json (sender summary), OUT.recv.json,
# OUT.wire (link bytes sender -> receiver).
ml_pct() {
	local src=$1 dst=$2 disk=$3 out=$4
	shift 4
	local from=${ML_FROM:-a} to before after rpid
	if [ "$from" = a ]; then to=b; else to=a; fi
	before=$(bash tools/netns.sh bytes "$NS" "$from")
	local profile_args recv_link send_link
	mapfile -t recv_link < <(ml_link_args "$to")
	mapfile -t send_link < <(ml_link_args "$from")
	ip netns exec "$NS-$to" "$PCT" receive --listen "$(ml_addr "$to"):7400" --qmp "$dst/qmp.sock" --disk "$disk" --json "${recv_link[@]}" >"$out.recv.json" 2>"$out.recv.err" &
	rpid=$!
	ML_PIDS+=("$rpid")
	mapfile -t profile_args < <(ml_profile_args)
	# ML_PCT_TIMEOUT=S: a sender still running after S seconds is killed (QEMU's migration
	# then fails and the source guest runs on); ml_pct returns 2.
	local limit=() rc=0
	[ -n "${ML_PCT_TIMEOUT:-}" ] && limit=(timeout -s KILL "$ML_PCT_TIMEOUT")
	ip netns exec "$NS-$from" "${limit[@]}" "$PCT" "${profile_args[@]}" --qmp "$src/qmp.sock" --to "$(ml_addr "$to"):7400" --json "${send_link[@]}" "$@" >"$out.json" 2>"$out.err" || rc=$?
	if [ "$rc" -eq 137 ] && [ -n "${ML_PCT_TIMEOUT:-}" ]; then
		echo "pct-migrate did not finish in $ML_PCT_TIMEOUT s: killed, the source guest runs on" >&2
		wait "$rpid" 2>/dev/null || true
		return 2
	elif [ "$rc" -ne 0 ]; then
		cat "$out.err" "$out.recv.err" >&2
		return 1
	fi
	wait "$rpid" || {
		cat "$out.recv.err" >&2
		return 1
	}
	after=$(bash tools/netns.sh bytes "$NS" "$from")
	echo $((after - before)) >"$out.wire"
}

# ml_stock FROM_DIR FROM_END TO_DIR TO_ADDR OUT [STOCK-FLAGS...]: stock QEMU migration over
# TCP across the link; writes OUT.json (query-migrate at the end, plus
# downtime_end_to_end_ms: source STOP to destination RESUME, as pct measures it) and
# OUT.wire (link bytes).
ml_stock() {
	local from=$1 end=$2 to=$3 addr=$4 out=$5 before after
	shift 5
	before=$(bash tools/netns.sh bytes "$NS" "$end")
	"$PCT" stock --from "$from/qmp.sock" --to "$to/qmp.sock" --uri "tcp:$addr" "$@" >"$out.json" || return 1
	after=$(bash tools/netns.sh bytes "$NS" "$end")
	echo $((after - before)) >"$out.wire"
}
