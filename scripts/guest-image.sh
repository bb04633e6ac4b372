#!/usr/bin/env bash
# Build ferry's test guest: a tiny bootable Linux (Debian's kernel plus an initramfs) that
# runs a file-writing workload on its data disk and answers the QEMU guest agent.
#
#   scripts/guest-image.sh              # build into $FERRY_GUEST_IMAGE (default ~/.cache/ferry/guest)
#   scripts/guest-image.sh --out DIR    # build into DIR
#   scripts/guest-image.sh --force      # rebuild even when the image is current
#
# Everything comes from Debian's packages (apt-get download: linux-image-amd64, busybox-static,
# qemu-guest-agent; the libraries the guest agent and e2fsprogs link against are copied from
# this machine, where scripts/install-deps.sh installed them). No other network access.
#
# The result is DIR/vmlinuz, DIR/initrd.img and DIR/VERSION. `ferry vm create NAME --host H
# --image guest --disk 512MiB` on a qemu host boots it (the driver finds DIR the same way).
#
# What the guest does (its /init, below):
#   1. loads the virtio and ext4 modules, finds its data disk /dev/vda (the VM's disk 0);
#   2. formats it with ext4 when it holds no file system yet;
#   3. mounts it once (the kernel replays the journal), unmounts, runs `e2fsck -fn` and prints
#      `FERRY-FSCK rc=N` (0: clean);
#   4. mounts it at /data and checks every well-formed line of /data/SHA256SUMS
#      (`sha256sum -c`), printing `FERRY-SUMS ok=N failed=N malformed=N last=f-NNNNNN`;
#   5. starts qemu-ga on the virtio-serial port org.qemu.guest_agent.0 (fsfreeze works);
#   6. forever: writes f-NNNNNN of random size (1-256 KiB), fsyncs it, appends its line to
#      SHA256SUMS, fsyncs that and prints `FERRY-SYNCED f-NNNNNN`, then sleeps `ferry.pace`
#      milliseconds (kernel command line; default 200).
# Everything it prints goes to the serial console (ttyS0), which the qemu driver keeps in
# the VM folder's console.log.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
out="${FERRY_GUEST_IMAGE:-$HOME/.cache/ferry/guest}"
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[guest-image] %s\n' "$*" >&2; }

# The image's version: this script's own hash (its /init and module list are inside it).
version="$(sha256sum "$0" | cut -c1-16)"
if [ "$force" -eq 0 ] && [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$version" ] \
    && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
    log "current: $out (version $version)"
    exit 0
fi

work="$(mktemp -d /tmp/ferry-guest-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cd "$work"

download() {
    # apt-get download writes into the current directory; as root it warns about the
    # sandbox user, which is harmless here.
    if ! apt-get download "$@" >/dev/null 2>apt.err; then
        log "apt-get download $* failed; updating the package lists once and retrying"
        apt-get update -qq
        apt-get download "$@" >/dev/null 2>apt.err || { cat apt.err >&2; exit 1; }
    fi
}

# The distribution kernel: linux-image-amd64 names the current versioned package.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
[ -n "$kpkg" ] || { apt-get update -qq; kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"; }
[ -n "$kpkg" ] || { echo "error: no linux-image-amd64 package in the apt sources" >&2; exit 1; }
log "downloading $kpkg, busybox-static, qemu-guest-agent"
download "$kpkg" busybox-static qemu-guest-agent

mkdir -p k bb ga root
# Only the kernel image and the modules the guest loads (the whole package is ~400 MB unpacked).
dpkg-deb --fsys-tarfile "$kpkg"_*.deb | tar -x -C k --wildcards \
    './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' \
    './lib/modules/*/kernel/drivers/block/virtio_blk.ko' \
    './lib/modules/*/kernel/drivers/char/virtio_console.ko' \
    './lib/modules/*/kernel/drivers/net/virtio_net.ko' \
    './lib/modules/*/kernel/drivers/net/net_failover.ko' \
    './lib/modules/*/kernel/net/core/failover.ko' \
    './lib/modules/*/kernel/fs/ext4/*' './lib/modules/*/kernel/fs/jbd2/*' \
    './lib/modules/*/kernel/fs/mbcache.ko' './lib/modules/*/kernel/lib/crc16.ko' \
    './lib/modules/*/kernel/crypto/crc32c_generic.ko'
dpkg-deb -x busybox-static_*.deb bb
dpkg-deb -x qemu-guest-agent_*.deb ga
kver="$(ls k/lib/modules)"
bbx="$work/bb/bin/busybox"

# Modules in load order (each after what it depends on).
mods=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
      virtio_console failover net_failover virtio_net crc16 mbcache jbd2 crc32c_generic ext4)
mkdir -p root/lib/modules root/bin root/sbin root/etc root/proc root/sys root/dev root/data \
    root/run root/tmp root/var
for m in "${mods[@]}"; do
    f="$(find k/lib/modules -name "$m.ko" | head -1)"
    [ -n "$f" ] || { echo "error: module $m is not in $kpkg" >&2; exit 1; }
    cp "$f" root/lib/modules/
    echo "$m" >>root/etc/modules
done

cp "$bbx" root/bin/busybox
cp ga/usr/sbin/qemu-ga root/sbin/
for p in mke2fs e2fsck; do
    src="$(command -v "$p" || true)"
    [ -n "$src" ] || { echo "error: $p is not installed (apt-get install e2fsprogs)" >&2; exit 1; }
    # Not in /sbin: busybox has applets of the same names, which `--install` would put first.
    mkdir -p root/opt/e2fs && cp "$src" root/opt/e2fs/
done
# Shared libraries of the dynamically linked programs, from this machine (Debian's packages).
for bin in root/sbin/qemu-ga root/opt/e2fs/mke2fs root/opt/e2fs/e2fsck; do
    if ldd "$bin" | grep -q 'not found'; then
        ldd "$bin" >&2
        echo "error: $bin needs libraries this machine lacks; run scripts/install-deps.sh (it installs QEMU and its libraries)" >&2
        exit 1
    fi
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/lib64\// { print $1 }' | while read -r lib; do
        mkdir -p "root$(dirname "$lib")"
        cp -L "$lib" "root$lib"
    done
done

cat >root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "FERRY-GUEST insmod $m failed"; done
pace=200
for a in $(cat /proc/cmdline); do
    case "$a" in ferry.pace=*) pace="${a#ferry.pace=}" ;; esac
done
echo "FERRY-GUEST boot $(cat /proc/uptime)"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then echo "FERRY-GUEST no data disk /dev/vda"; exec sleep 2147483647; fi
# An ext4 superblock has the magic 0xEF53 at byte 1080.
if [ "$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' ')" != 53ef ]; then
    echo "FERRY-GUEST formatting /dev/vda"
    /opt/e2fs/mke2fs -q -t ext4 -F /dev/vda
fi
# The kernel replays the journal on mount; e2fsck then checks what a crash left.
mount -t ext4 /dev/vda /data && umount /data
/opt/e2fs/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1
echo "FERRY-FSCK rc=$?"
[ -s /tmp/fsck.log ] && sed 's/^/FERRY-FSCK-LOG /' /tmp/fsck.log | tail -n 20
mount -t ext4 /dev/vda /data || { echo "FERRY-GUEST mount failed"; exec sleep 2147483647; }
cd /data
touch SHA256SUMS
grep -E '^[0-9a-f]{64}  f-[0-9]{6}$' SHA256SUMS >/tmp/good || true
malformed=$(( $(wc -l <SHA256SUMS) - $(wc -l </tmp/good) ))
[ -n "$(tail -c 1 SHA256SUMS)" ] && malformed=$((malformed + 1))
sha256sum -c /tmp/good >/tmp/check 2>&1 || true
ok=$(grep -c ': OK$' /tmp/check || true)
failed=$(( $(wc -l </tmp/good) - ok ))
last=$(tail -n 1 /tmp/good | cut -c67-)
echo "FERRY-SUMS ok=$ok failed=$failed malformed=$malformed last=${last:-none}"
grep -v ': OK$' /tmp/check | sed 's/^/FERRY-SUMS-LOG /' | head -n 20
# Keep the well-formed lines (a torn last line goes; a failed one stays, so damage shows at
# every boot), replaced atomically: a stop in the middle leaves the old list or the new one.
cp /tmp/good SHA256SUMS.new && sync SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS && sync -f /data
port=""
for d in /sys/class/virtio-ports/*; do
    [ "$(cat "$d/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port="/dev/$(basename "$d")"
done
if [ -n "$port" ]; then
    qemu-ga -m virtio-serial -p "$port" -t /run -l /run/qemu-ga.log &
    echo "FERRY-GUEST agent on $port"
else
    echo "FERRY-GUEST no guest-agent port"
fi
n=1
[ -n "$last" ] && n=$(( $(echo "$last" | sed 's/^f-0*//;s/^$/0/') + 1 ))
echo "FERRY-GUEST workload from f-$(printf %06d $n) pace ${pace}ms"
while :; do
    f=$(printf 'f-%06d' $n)
    kb=$(( $(od -An -N2 -tu2 /dev/urandom) % 256 + 1 ))
    if dd if=/dev/urandom of=$f bs=1024 count=$kb conv=fsync 2>/dev/null \
        && sha256sum $f >>SHA256SUMS && sync SHA256SUMS; then
        echo "FERRY-SYNCED $f"
        n=$((n + 1))
    else
        echo "FERRY-GUEST write failed at $f (disk full?)"
        sleep 5
    fi
    usleep $((pace * 1000))
done
INIT
chmod +x root/init
ln -sf busybox root/bin/sh

mkdir -p "$out"
cp k/boot/vmlinuz-* "$out/vmlinuz.new"
(cd root && find . | "$bbx" cpio -o -H newc 2>/dev/null | gzip -1) >"$out/initrd.img.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.img.new" "$out/initrd.img"
echo "$version" >"$out/VERSION"
log "built $out (kernel $kver, initramfs $(du -h "$out/initrd.img" | cut -f1))"
