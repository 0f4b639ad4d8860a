#!/usr/bin/env bash
# Start one lab guest under QEMU (exec: the caller owns the QEMU process).
#
#   tools/lab/run-guest.sh --dir RUNDIR [--workload apache|aged|idle|db] [--fileset web|mini|db]
#       [--layout plain|part|bs1k|bs2k|noextent|xfs] [--flavour cloud-amd64|amd64|rt-amd64]
#       [--mem MiB|KiBK] [--smp N] [--accel tcg|kvm] [--cpu MODEL] [--disk IMG] [--incoming] [--paused] [--name NAME]
#       [--anon-ram]   (plain anonymous guest RAM instead of a shared file in /dev/shm)
#       [--uuid UUID]  (the guest's -uuid)
#       [--qemu CHOICE] (system (default), backports (QEMU 10.0, tools/lab/fetch-qemu.sh) or a
#                       prefix holding usr/bin/qemu-system-x86_64; default: $PCT_QEMU)
#       [--machine TYPE] (default pc-i440fx-7.2, which every QEMU here knows)
#       [--suite SUITE] (the guest kernel's Debian suite: bookworm (default), trixie, bullseye)
#       [--append ARGS] (more guest kernel command-line arguments, e.g. init_on_free=1)
#       [--bare]       (SeaBIOS alone: no kernel, disks, serial port or vmcoreinfo; the
#                       stream tests' guest. Only qmp.sock, qmp-pct.sock, ram.path, qemu.pid)
#
# RUNDIR receives: disk.img (a copy of the pristine lab disk, unless --disk names one),
# oracle.img (where the guest's pct-oracle writes), qmp.sock and qmp-pct.sock (two
# monitors: QEMU serves one client each, so pct gets its own), serial.sock (write
# commands here), serial.log (everything the guest printed), ram.path (the path of the
# guest RAM file in /dev/shm, memory-backend-file share=on), qemu.pid. A RAM file that
# already exists is used with its contents.
# With --incoming the guest waits for a migration (-incoming defer) instead of booting.
#
# Ready marker: the line "PCT-READY" in serial.log. Kill the QEMU process and remove
# the RAM file when done (the Rust lab helpers in tests/ do both, even on failure).
source "$(dirname "$0")/common.sh"

suite=bookworm qemu_prefix=${PCT_QEMU:-} machine=pc-i440fx-7.2 dir= workload=apache fileset= layout=plain flavour=cloud-amd64 mem=1024 smp=1 accel=tcg cpu= disk= incoming= paused= name= anon_ram= uuid= bare= append=
while [ $# -gt 0 ]; do
	case "$1" in
	--dir) dir=$2; shift ;;
	--workload) workload=$2; shift ;;
	--fileset) fileset=$2; shift ;;
	--layout) layout=$2; shift ;;
	--flavour) flavour=$2; shift ;;
	--mem) mem=$2; shift ;;
	--smp) smp=$2; shift ;; # vCPUs: under TCG, one host thread each (MTTCG)
	--accel) accel=$2; shift ;;
	--cpu) cpu=$2; shift ;; # e.g. max: with la57 the guest kernel runs 5-level paging
	--disk) disk=$2; shift ;;
	--incoming) incoming=1 ;;
	--paused) paused=1 ;;
	--anon-ram) anon_ram=1 ;;
	--name) name=$2; shift ;;
	--uuid) uuid=$2; shift ;;
	--bare) bare=1 ;;
	--qemu) qemu_prefix=$2; shift ;;
	--machine) machine=$2; shift ;;
	--suite) suite=$2; shift ;;
	--append) append=$2; shift ;;
	*) die "unknown argument '$1' (see the header of $0)" ;;
	esac
	shift
done
[ -n "$dir" ] || die "--dir RUNDIR is required"
[[ "$smp" =~ ^[1-9][0-9]?$ ]] || die "--smp $smp: give a number of vCPUs from 1 to 99"
case "$workload" in apache | aged | idle | db) ;; *) die "unknown workload '$workload' (apache, aged, idle, db)" ;; esac
[ -n "$fileset" ] || fileset=$([ "$workload" = db ] && echo db || echo web)
case "$accel" in
tcg) ;;
kvm) [ -w /dev/kvm ] || die "--accel kvm needs a writable /dev/kvm" ;;
*) die "unknown accelerator '$accel' (tcg or kvm)" ;;
esac

bash "$LAB_DIR/ensure-host.sh"
qemu_prefix=$(qemu_prefix_of "$qemu_prefix")
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -z "$bare" ]; then
	kdir=$(bash "$LAB_DIR/fetch-kernel.sh" "$flavour" "$suite" | tail -1)
	initrd=$(bash "$LAB_DIR/build-initramfs.sh" "$kdir" | tail -1)
	master=$(bash "$LAB_DIR/build-disk.sh" "$fileset" "$layout" | tail -1)
	if [ -z "$disk" ]; then
		disk=$dir/disk.img
		[ -f "$disk" ] || cp --sparse=always "$master" "$disk"
	fi
	[ -f "$dir/oracle.img" ] || truncate -s 64M "$dir/oracle.img"
fi
root=/dev/vda
[ "$layout" = part ] && root=/dev/vda1
# The xfs layout: ext4 in partition 1, XFS in partition 2 (mounted at /xfs by the init).
[ "$layout" = xfs ] && root=/dev/vda1 && append="pct.xfs=/dev/vda2${append:+ $append}"

# --mem is MiB, or KiB with a K suffix (e.g. 1048584K: 1 GiB + 8 KiB, see
# tools/qemu-lost-writes.sh).
case "$mem" in
*K) mem_kb=${mem%K} ;;
*) mem_kb=$mem; [[ "$mem" =~ ^[0-9]+$ ]] && mem_kb=$((mem * 1024)) ;;
esac
[[ "$mem_kb" =~ ^[0-9]+$ ]] && [ "$mem_kb" -gt 0 ] && [ $((mem_kb % 8)) -eq 0 ] ||
	die "--mem $mem: give MiB, or KiB with a K suffix (a multiple of 8)"
mem=$((mem_kb / 1024))

# Guest RAM in /dev/shm: check room first, a full tmpfs kills QEMU with SIGBUS later.
avail_kb=$(df -k --output=avail /dev/shm | tail -1)
[ "$avail_kb" -ge "$mem_kb" ] ||
	die "/dev/shm has $((avail_kb / 1024)) MiB free, the guest needs $mem MiB: remove stale /dev/shm/pct-* files or enlarge /dev/shm"
name=${name:-pct-lab-$$}
ram=/dev/shm/$name
echo "$ram" >"$dir/ram.path"
rm -f "$dir/qmp.sock" "$dir/qmp-pct.sock" "$dir/serial.sock"

if [ -n "$anon_ram" ]; then
	ram_args=(-machine "$machine" -m "${mem_kb}K")
	: >"$dir/ram.path"
else
	ram_args=(-machine "$machine,memory-backend=ram0" -m "${mem_kb}K"
		-object "memory-backend-file,id=ram0,size=${mem_kb}K,mem-path=$ram,share=on")
fi
boot=()
[ -n "$bare" ] || boot=(
	-kernel "$kdir/vmlinuz" -initrd "$initrd"
	-append "console=ttyS0 quiet panic=-1 pct.workload=$workload pct.root=$root pct.oracle=/dev/vdb${append:+ $append}"
	-drive "file=$disk,format=raw,if=virtio,cache=writeback"
	-drive "file=$dir/oracle.img,format=raw,if=virtio"
	-device vmcoreinfo
	-chardev "socket,id=s0,path=$dir/serial.sock,server=on,wait=off,logfile=$dir/serial.log,logappend=on"
	-serial chardev:s0
)
args=(
	-name "$name" -accel "$accel" "${ram_args[@]}"
	-smp "$smp" -nodefaults -display none -no-reboot -no-user-config
	"${boot[@]}"
	-qmp "unix:$dir/qmp.sock,server=on,wait=off"
	-qmp "unix:$dir/qmp-pct.sock,server=on,wait=off"
)
[ -n "$uuid" ] && args+=(-uuid "$uuid")
[ -n "$cpu" ] && args+=(-cpu "$cpu")
[ -n "$incoming" ] && args+=(-incoming defer)
[ -n "$paused" ] && args+=(-S)
echo $$ >"$dir/qemu.pid"
if [ -n "$qemu_prefix" ]; then
	exec "$qemu_prefix/usr/bin/qemu-system-x86_64" -L "$qemu_prefix/usr/share/qemu" "${args[@]}"
fi
exec qemu-system-x86_64 "${args[@]}"
