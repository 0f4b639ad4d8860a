#!/usr/bin/env bash
# Two libvirt "hosts" on one machine, for migrations that real libvirt drives: two libvirtd
# daemons, each in a network namespace of its own (tools/netns.sh: NAME-a at 10.77.0.1,
# NAME-b at 10.77.0.2, a tbf-shaped veth link between them) and a mount namespace of its
# own, with private run, state, cache, log and config directories and distinct host UUIDs
# (libvirt refuses to migrate a guest to "the same host").
#
#   tools/lab/libvirt.sh up DIR NAME [RATE]   start both daemons; DIR receives a/ and b/
#                                             (each: sock/libvirt-sock, libvirtd.log,
#                                             ram/ (guest RAM files), qemu logs)
#   tools/lab/libvirt.sh down DIR             stop every guest and both daemons, delete the
#                                             namespaces; safe to run twice, or after a
#                                             failed `up`
#   tools/lab/libvirt.sh xml NAME UUID WORKLOAD DISK ORACLE SERIALDIR
#                                             a TCG domain of the lab's kernel, initramfs and
#                                             WORKLOAD on DISK (raw), its oracle disk and a
#                                             serial console (SERIALDIR/serial.sock, .log)
#   tools/lab/libvirt.sh virsh DIR a|b ARGS…  virsh on one daemon
#
# Each daemon's QEMU driver runs guests as root, without cgroups, namespaces or a security
# driver (none of which this lab machine provides), with guest RAM in files under its ram/
# (memory_backing_dir): the tests read a migrated guest's RAM there after QEMU exits.
# Installing libvirt: tools/lab/ensure-host.sh (Debian's libvirt-daemon-system,
# libvirt-clients, libvirt-daemon-driver-qemu).
source "$(dirname "$0")/common.sh"

cmd=${1:-}
shift || true

# sock_uri DIR SIDE: the libvirt URI of one daemon.
sock_uri() {
	echo "qemu+unix:///system?socket=$1/$2/sock/libvirt-sock"
}

# start_daemon DIR SIDE NETNS UUID: one libvirtd in NETNS and a private mount namespace.
start_daemon() {
	local dir=$1 side=$2 ns=$3 uuid=$4
	local d=$dir/$side
	mkdir -p "$d"/{sock,run,lib,cache,log,ram}
	cp -a /etc/libvirt "$d/etc"
	# No default network (it would start dnsmasq and a bridge), nothing autostarted.
	rm -rf "$d/etc/qemu/networks/autostart" "$d/etc/qemu/autostart"
	cat >>"$d/etc/qemu.conf" <<-EOF

		# pct lab (tools/lab/libvirt.sh)
		user = "root"
		group = "root"
		dynamic_ownership = 0
		remember_owner = 0
		security_driver = "none"
		namespaces = [ ]
		cgroup_controllers = [ ]
		stdio_handler = "file"
		memory_backing_dir = "$d/ram"
	EOF
	cat >"$d/libvirtd.conf" <<-EOF
		unix_sock_dir = "$d/sock"
		unix_sock_rw_perms = "0700"
		auth_unix_rw = "none"
		auth_unix_ro = "none"
		host_uuid = "$uuid"
		log_outputs = "3:file:$d/libvirtd.log"
	EOF
	ip netns exec "$ns" unshare -m --propagation private bash -c "
		set -e
		mount -t tmpfs tmpfs /run/libvirt 2>/dev/null || { mkdir -p /run/libvirt; mount -t tmpfs tmpfs /run/libvirt; }
		mount --bind '$d/lib' /var/lib/libvirt
		mount --bind '$d/cache' /var/cache/libvirt
		mount --bind '$d/log' /var/log/libvirt
		mount --bind '$d/etc' /etc/libvirt
		mkdir -p /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
		libvirtd -d -f '$d/libvirtd.conf' -p '$d/run/libvirtd.pid'
	"
	for _ in $(seq 100); do
		[ -S "$d/sock/libvirt-sock" ] && virsh -q -c "$(sock_uri "$dir" "$side")" version >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	tail -20 "$d/libvirtd.log" >&2 || true
	die "libvirtd $side did not answer on $d/sock/libvirt-sock"
}

case "$cmd" in
up)
	dir=${1:?DIR}
	name=${2:?NAME}
	rate=${3:-1gbit}
	bash "$LAB_DIR/ensure-host.sh"
	for c in libvirtd virsh ip tc unshare; do
		command -v "$c" >/dev/null || die "$c is missing: run tools/lab/ensure-host.sh as root"
	done
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	echo "$name" >"$dir/netns"
	bash "$REPO_DIR/tools/netns.sh" up "$name" "$rate"
	start_daemon "$dir" a "$name-a" "$(cat /proc/sys/kernel/random/uuid)"
	start_daemon "$dir" b "$name-b" "$(cat /proc/sys/kernel/random/uuid)"
	;;
down)
	dir=${1:?DIR}
	[ -d "$dir" ] || exit 0
	dir=$(cd "$dir" && pwd)
	for side in a b; do
		d=$dir/$side
		if [ -S "$d/sock/libvirt-sock" ]; then
			for dom in $(virsh -q -c "$(sock_uri "$dir" "$side")" list --all --name 2>/dev/null); do
				virsh -q -c "$(sock_uri "$dir" "$side")" destroy "$dom" >/dev/null 2>&1 || true
				virsh -q -c "$(sock_uri "$dir" "$side")" undefine "$dom" >/dev/null 2>&1 || true
			done
		fi
		# Any QEMU the daemon left (it names its pid files after the domain).
		for pidfile in "$d"/run/*.pid "$d"/lib/qemu/*.pid; do
			[ -f "$pidfile" ] || continue
			pid=$(cat "$pidfile" 2>/dev/null || true)
			[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
		done
		if [ -f "$d/run/libvirtd.pid" ]; then
			pid=$(cat "$d/run/libvirtd.pid")
			kill "$pid" 2>/dev/null || true
			for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			kill -9 "$pid" 2>/dev/null || true
		fi
	done
	# QEMU processes started by either daemon, found by their RAM files under DIR.
	for pid in $(pgrep -f "qemu-system-x86_64.*$dir/" || true); do
		kill -9 "$pid" 2>/dev/null || true
	done
	[ -f "$dir/netns" ] && bash "$REPO_DIR/tools/netns.sh" down "$(cat "$dir/netns")"
	rm -rf "$dir"/a/ram "$dir"/b/ram
	;;
xml)
	name=${1:?NAME} uuid=${2:?UUID} workload=${3:?WORKLOAD} disk=${4:?DISK} oracle=${5:?ORACLE} sdir=${6:?SERIALDIR}
	kdir=$(bash "$LAB_DIR/fetch-kernel.sh" cloud-amd64 bookworm | tail -1)
	initrd=$(bash "$LAB_DIR/build-initramfs.sh" "$kdir" | tail -1)
	cat <<-EOF
		<domain type='qemu'>
		  <name>$name</name>
		  <uuid>$uuid</uuid>
		  <memory unit='MiB'>1024</memory>
		  <memoryBacking>
		    <source type='file'/>
		    <access mode='shared'/>
		  </memoryBacking>
		  <vcpu>1</vcpu>
		  <os>
		    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
		    <kernel>$kdir/vmlinuz</kernel>
		    <initrd>$initrd</initrd>
		    <cmdline>console=ttyS0 quiet panic=-1 pct.workload=$workload pct.root=/dev/vda pct.oracle=/dev/vdb</cmdline>
		  </os>
		  <features>
		    <acpi/>
		    <vmcoreinfo state='on'/>
		  </features>
		  <on_poweroff>destroy</on_poweroff>
		  <on_reboot>destroy</on_reboot>
		  <on_crash>destroy</on_crash>
		  <devices>
		    <emulator>$(command -v qemu-system-x86_64)</emulator>
		    <disk type='file' device='disk'>
		      <driver name='qemu' type='raw' cache='writeback'/>
		      <source file='$disk'/>
		      <target dev='vda' bus='virtio'/>
		    </disk>
		    <disk type='file' device='disk'>
		      <driver name='qemu' type='raw'/>
		      <source file='$oracle'/>
		      <target dev='vdb' bus='virtio'/>
		    </disk>
		    <serial type='unix'>
		      <source mode='bind' path='$sdir/serial.sock'/>
		      <log file='$sdir/serial.log' append='on'/>
		      <target port='0'/>
		    </serial>
		    <controller type='usb' model='none'/>
		    <memballoon model='none'/>
		  </devices>
		</domain>
	EOF
	;;
virsh)
	dir=${1:?DIR} side=${2:?a or b}
	shift 2
	exec virsh -c "$(sock_uri "$(cd "$dir" && pwd)" "$side")" "$@"
	;;
*)
	die "tools/lab/libvirt.sh: unknown command '$cmd' (up, down, xml, virsh)"
	;;
esac
