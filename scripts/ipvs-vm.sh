#!/usr/bin/env bash
# Runs a program inside Debian's cloud kernel (which has IPVS) under QEMU (TCG), with a busybox
# initramfs, and prints the guest console. The kernel and a base initramfs (busybox and the
# kernel's network and netfilter modules) are cached in /var/cache/kwp/ipvs-vm/<kernel version>/
# and fetched with apt (Debian's mirror) when missing.
# Usage: scripts/ipvs-vm.sh PROGRAM [ARGS...]
#   PROGRAM may be static or dynamic: a dynamic one gets its shared libraries (from ldd).
#   KWP_IPVS_VM_FILES  host programs/files placed at the same absolute path in the guest (dynamic
#                      ones with their libraries, debug info stripped), e.g. kwp, ip, nft.
#   KWP_IPVS_VM_MEM    guest memory in MiB (1024); KWP_IPVS_VM_SMP CPUs (1);
#   KWP_IPVS_VM_TIMEOUT seconds before the VM is killed (300).
#   KWP_IPVS_VM_ENV    NAME=value words exported to the program in the guest.
#   KWP_IPVS_VM_NET=1  a virtio NIC on QEMU user networking: the guest is 10.0.2.15/24 on eth0
#                      with no default route, so it reaches only 10.0.2.2, which QEMU maps to
#                      the host's loopback (scripts/ipvs-vm-bench.sh: an API server there).
# The guest sees KWP_IPVS_VM_GUEST=1 and a `KWP-VM-PROBE-EXIT <status>` line ends the run.
# Exit 77: this machine cannot run the VM (no qemu and no apt to install it, no kernel package).
set -euo pipefail
prog=${1:?usage: ipvs-vm.sh PROGRAM [ARGS...]}
shift
cache=${KWP_IPVS_VM_CACHE:-/var/cache/kwp/ipvs-vm}
# The base archive's name changes when what it holds changes, so old caches are rebuilt.
base=base-net-v3.cpio.gz
skip() { echo "ipvs-vm: SKIP: $*" >&2; exit 77; }

need=""
for p in qemu-system-x86 cpio kmod busybox-static binutils; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [ -n "$need" ]; then
  { apt-get update -qq && apt-get install -y -qq $need >/dev/null; } || skip "cannot install$need"
fi
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64"

# One builder of the cache at a time (two tests may boot VMs at once).
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# The newest cached kernel, or the one Debian's meta package names.
ver=$(ls -1 "$cache" 2>/dev/null | grep -- '-cloud-amd64$' | sort -V | tail -1 || true)
if [ -z "$ver" ] || [ ! -f "$cache/$ver/vmlinuz" ] || [ ! -f "$cache/$ver/$base" ]; then
  img=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$img" ] || { apt-get update -qq || true; img=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); }
  [ -n "$img" ] || skip "no linux-image-cloud-amd64 in apt"
  ver=${img#linux-image-}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "$img" >/dev/null) || skip "cannot download $img"
  mkdir -p "$work/kernel" "$work/root"/{bin,proc,sys,dev,tmp,run,lib/modules/"$ver"}
  dpkg -x "$work"/"$img"_*.deb "$work/kernel"
  cp /bin/busybox "$work/root/bin/busybox"
  # ipset and iptables (its nft backend), which upstream kube-proxy's IPVS mode runs, from
  # Debian's packages with their libraries; libc comes with the overlay's host programs.
  (cd "$work" && apt-get download ipset libipset13 iptables libip4tc2 libip6tc2 libxtables12 \
     libmnl0 libnetfilter-conntrack3 libnfnetlink0 libnftnl11 >/dev/null) || skip "cannot download ipset/iptables"
  for deb in "$work"/*.deb; do
    case $deb in *linux-image-*) ;; *) dpkg -x "$deb" "$work/root" ;; esac
  done
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf xtables-nft-multi "$work/root/usr/sbin/$t"
  done
  rm -rf "$work/root/usr/share"
  # Only what the tests use (IPVS, netfilter, bridges, veth, dummy) and what those depend on:
  # the whole module tree would triple the archive the guest unpacks under emulation.
  src="$work/kernel/lib/modules/$ver"
  (cd "$src" && find kernel/net kernel/lib kernel/arch/x86/crypto kernel/crypto \
     kernel/drivers/net/dummy.ko kernel/drivers/net/veth.ko kernel/drivers/net/virtio_net.ko \
     kernel/drivers/net/net_failover.ko kernel/drivers/virtio -name '*.ko' 2>/dev/null |
     cpio -pdm --quiet "$work/root/lib/modules/$ver")
  cp "$src"/modules.builtin* "$src"/modules.order "$work/root/lib/modules/$ver/" 2>/dev/null || true
  depmod -b "$work/root" "$ver"
  mkdir -p "$cache/$ver"
  cp "$work/kernel/boot/vmlinuz-$ver" "$cache/$ver/vmlinuz.tmp" && mv "$cache/$ver/vmlinuz.tmp" "$cache/$ver/vmlinuz"
  (cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$cache/$ver/$base.tmp"
  mv "$cache/$ver/$base.tmp" "$cache/$ver/$base"
fi
flock -u 9

run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
mkdir -p "$run/root"/{sbin,usr/bin,usr/sbin,etc}

# Copies host file $1 to guest path $2; an ELF file without debug info, plus its libraries.
place() {
  local from=$1 to=$run/root$2
  mkdir -p "$(dirname "$to")"
  if head -c4 "$from" | grep -q ELF; then
    strip --strip-debug -o "$to" "$from" 2>/dev/null || cp "$from" "$to"
    chmod +x "$to"
    # (A static program has none: ldd fails, which is fine.)
    { ldd "$from" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
      [ -f "$run/root$lib" ] || { mkdir -p "$run/root$(dirname "$lib")"; cp -L "$lib" "$run/root$lib"; }
    done
  else
    cp -L "$from" "$to"
  fi
}
place "$prog" /probe
# A shell that runs programs from PATH: busybox's own sh prefers its applets (its `ip` has no netns).
[ -x /bin/dash ] && place /bin/dash /bin/sh
for f in ${KWP_IPVS_VM_FILES:-}; do place "$f" "$f"; done
# Name databases nft and libc look up.
for f in /etc/protocols /etc/services; do [ -f "$f" ] && cp "$f" "$run/root$f"; done
printf '%q ' "$@" > "$run/root/probe-args"
echo "KWP_IPVS_VM_NET=${KWP_IPVS_VM_NET:-0}" > "$run/root/vm-env"
for kv in ${KWP_IPVS_VM_ENV:-}; do printf 'export %q\n' "$kv" >> "$run/root/vm-env"; done
net=()
if [ "${KWP_IPVS_VM_NET:-0}" = 1 ]; then
  net=(-netdev user,id=n0,ipv6=off -device virtio-net-pci,netdev=n0,romfile=)
fi
cat > "$run/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin KWP_IPVS_VM_GUEST=1 HOME=/root TMPDIR=/tmp
. /vm-env
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmpfs /run
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /root; hostname kwp-vm
modprobe ip_vs && modprobe dummy && echo KWP-VM-IPVS-LOADED
for m in ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_mh ip_vs_sh veth bridge nf_tables nf_conntrack nf_nat \
  nf_conntrack_netlink nft_ct nft_nat nft_chain_nat nft_masq nft_reject_inet nft_fib_inet \
  nft_numgen nft_objref nft_hash nft_limit nft_redir; do modprobe $m 2>/dev/null; done
ip link set lo up
if [ "$KWP_IPVS_VM_NET" = 1 ]; then
  # What upstream kube-proxy's ipset and iptables-nft calls load (the kernel would ask
  # busybox's modprobe for most of them on demand; loading them here is one place to look).
  for m in nft_compat xt_comment xt_mark xt_addrtype xt_conntrack xt_MASQUERADE xt_nat \
    xt_tcpudp xt_multiport xt_set ip_set ip_set_hash_ip ip_set_hash_ipport ip_set_hash_ipportip \
    ip_set_hash_ipportnet ip_set_hash_net ip_set_bitmap_port virtio_pci virtio_net; do
    modprobe $m 2>/dev/null
  done
  # No default route: the guest reaches 10.0.2.2 (the host's loopback) and nothing else.
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo KWP-VM-NET-UP
fi
echo "KWP-VM-BOOTED $(cut -d' ' -f1 /proc/uptime)"
eval "/probe $(cat /probe-args)"
echo "KWP-VM-PROBE-EXIT $?"
poweroff -f
INIT
chmod +x "$run/root/init"
# Uncompressed: the guest would spend longer inflating big binaries than reading them.
(cd "$run/root" && find . | cpio -o -H newc 2>/dev/null) > "$run/overlay.cpio"
# The kernel reads an uncompressed archive only at a 4-byte boundary; zeros between are skipped.
{ cat "$cache/$ver/$base"; head -c $(( (4 - $(stat -c %s "$cache/$ver/$base") % 4) % 4 )) /dev/zero
  cat "$run/overlay.cpio"; } > "$run/initrd"
# no_timer_check: on a loaded host the emulated clock is slow enough for the kernel's IO-APIC
# timer check to fail and panic at boot ("IO-APIC + timer doesn't work!", seen at load 20).
timeout "${KWP_IPVS_VM_TIMEOUT:-300}" qemu-system-x86_64 -accel tcg -cpu max \
  -m "${KWP_IPVS_VM_MEM:-1024}" -smp "${KWP_IPVS_VM_SMP:-1}" -nographic -no-reboot \
  -kernel "$cache/$ver/vmlinuz" -initrd "$run/initrd" "${net[@]}" \
  -append "console=ttyS0 quiet panic=-1 no_timer_check" | stdbuf -oL tr -d '\r'
