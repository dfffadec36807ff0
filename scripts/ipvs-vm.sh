#!/usr/bin/env bash
# Runs a static program inside Debian's cloud kernel (which has IPVS) under QEMU (TCG), with a
# busybox initramfs, and prints the guest console. The kernel and a base initramfs (busybox and
# the kernel's modules) are cached in /var/cache/kwp/ipvs-vm/<kernel version>/ and fetched with
# apt (Debian's mirror) when missing.
# Usage: scripts/ipvs-vm.sh STATIC_PROGRAM [ARGS...]
# Exit 77: this machine cannot run the VM (no qemu and no apt to install it, no kernel package).
set -euo pipefail
prog=${1:?usage: ipvs-vm.sh STATIC_PROGRAM [ARGS...]}
shift
cache=${KWP_IPVS_VM_CACHE:-/var/cache/kwp/ipvs-vm}
skip() { echo "ipvs-vm: SKIP: $*" >&2; exit 77; }

need=""
for p in qemu-system-x86 cpio kmod busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [ -n "$need" ]; then
  { apt-get update -qq && apt-get install -y -qq $need >/dev/null; } || skip "cannot install$need"
fi
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64"

# The newest cached kernel, or the one Debian's meta package names.
ver=$(ls -1 "$cache" 2>/dev/null | grep -- '-cloud-amd64$' | sort -V | tail -1 || true)
if [ -z "$ver" ] || [ ! -f "$cache/$ver/vmlinuz" ] || [ ! -f "$cache/$ver/base.cpio.gz" ]; then
  img=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$img" ] || { apt-get update -qq || true; img=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); }
  [ -n "$img" ] || skip "no linux-image-cloud-amd64 in apt"
  ver=${img#linux-image-}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "$img" >/dev/null) || skip "cannot download $img"
  mkdir -p "$work/kernel" "$work/root"/{bin,proc,sys,dev,tmp,run,lib}
  dpkg -x "$work"/"$img"_*.deb "$work/kernel"
  cp /bin/busybox "$work/root/bin/busybox"
  cp -a "$work/kernel/lib/modules" "$work/root/lib/"
  depmod -b "$work/root" "$ver"
  mkdir -p "$cache/$ver"
  cp "$work/kernel/boot/vmlinuz-$ver" "$cache/$ver/vmlinuz.tmp" && mv "$cache/$ver/vmlinuz.tmp" "$cache/$ver/vmlinuz"
  (cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$cache/$ver/base.cpio.gz.tmp"
  mv "$cache/$ver/base.cpio.gz.tmp" "$cache/$ver/base.cpio.gz"
fi

# The program and an init that runs it, appended as a second archive.
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
mkdir -p "$run/root"/{sbin,usr/bin,usr/sbin}
cp "$prog" "$run/root/probe"
printf '%q ' "$@" > "$run/root/probe-args"
cat > "$run/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmpfs /run
modprobe ip_vs && modprobe dummy && echo KWP-VM-IPVS-LOADED
ip link set lo up
eval "/probe $(cat /probe-args)"
echo "KWP-VM-PROBE-EXIT $?"
poweroff -f
INIT
chmod +x "$run/root/init"
(cd "$run/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$run/overlay.cpio.gz"
cat "$cache/$ver/base.cpio.gz" "$run/overlay.cpio.gz" > "$run/initrd.gz"
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 -nographic -no-reboot \
  -kernel "$cache/$ver/vmlinuz" -initrd "$run/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1" | tr -d '\r'
