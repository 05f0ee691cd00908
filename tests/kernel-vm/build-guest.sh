#!/usr/bin/env bash
# Build the guest for tests/tests/kernel_client.rs: Debian's kernel (booted as an uncompressed
# PVH vmlinux) and an initramfs holding busybox, socat, mke2fs, nbd-client, the nbd/ext4/virtio
# modules and our /init (tests/kernel-vm/init).
#
#   build-guest.sh [OUTDIR]      OUTDIR defaults to <workspace>/target/kernel-vm
#
# Idempotent: the downloaded .debs are kept in OUTDIR/debs, and OUTDIR/vmlinux +
# OUTDIR/initramfs.cpio are only rebuilt when an input changed (this script, init, a .deb, a
# host tool). Needs (Debian 12, root not required except for apt-get update):
#   apt lists that know linux-image-*-amd64 and nbd-client (apt-get update),
#   busybox-static, socat, e2fsprogs, kmod, cpio, xz-utils.
# Env: NBDCRYPT_GUEST_KERNEL=<version> (e.g. 6.1.0-56-amd64) picks the kernel package.
# Prints the two paths on its last lines: "vmlinux=PATH" and "initramfs=PATH".
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
export LC_ALL=C
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-$HERE/../../target/kernel-vm}

die() { echo "build-guest.sh: $*" >&2; exit 1; }

# --- host prerequisites: fail naming the package --------------------------------------------
need() { # need TOOL PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "missing prerequisite \`$1\` (Debian package $2; ./scripts/test.sh installs it)"
}
need apt-get apt; need apt-cache apt; need dpkg dpkg
need cpio cpio; need socat socat; need mke2fs e2fsprogs; need modprobe kmod; need depmod kmod
need xz xz-utils; need ldd libc-bin; need flock util-linux
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && "$BUSYBOX" --list | grep -x fstrim >/dev/null \
  && case "$(ldd "$BUSYBOX" 2>&1 || true)" in *"not a dynamic"*) true;; *) false;; esac \
  || die "missing prerequisite: a static $BUSYBOX with fstrim (Debian package busybox-static)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Several tests may call this at once: one builds, the others wait and then find it up to date.
exec 9> "$OUT"/.lock
flock 9

# --- which kernel ------------------------------------------------------------------------------
# The version the recipe (docs/kernel-client-vm.md) was measured with; else the newest plain
# linux-image-*-amd64 apt knows about.
DEFAULT_KVER=6.1.0-56-amd64
have_pkg() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }
if [ -n "${NBDCRYPT_GUEST_KERNEL:-}" ]; then
  KVER=$NBDCRYPT_GUEST_KERNEL
elif ls "$OUT"/debs/linux-image-"$DEFAULT_KVER"_*.deb >/dev/null 2>&1 || have_pkg "linux-image-$DEFAULT_KVER"; then
  KVER=$DEFAULT_KVER
else
  KVER=$(apt-cache search --names-only '^linux-image-[0-9][^ ]*-amd64$' | awk '{print $1}' \
         | grep -Ev -- '-(cloud|rt|dbg|unsigned)-' | sed 's/^linux-image-//' | sort -V | tail -1)
  [ -n "$KVER" ] || die "apt-cache knows no linux-image-*-amd64 package: run apt-get update"
fi

# --- download (cached) -------------------------------------------------------------------------
mkdir -p "$OUT"/debs
fetch() { # fetch PACKAGE -> path of its .deb in $OUT/debs
  local f
  f=$(ls "$OUT"/debs/"$1"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    echo "build-guest.sh: apt-get download $1" >&2
    # Into a scratch dir first, so an interrupted download never lands in the cache.
    rm -rf "$OUT"/debs/.part && mkdir "$OUT"/debs/.part
    (cd "$OUT"/debs/.part && apt-get download -q -o APT::Sandbox::User=root "$1" >&2) \
      || die "apt-get download $1 failed (network? apt lists? try apt-get update)"
    mv "$OUT"/debs/.part/*.deb "$OUT"/debs/ && rmdir "$OUT"/debs/.part
    f=$(ls "$OUT"/debs/"$1"_*.deb 2>/dev/null | head -1 || true)
    [ -n "$f" ] || die "apt-get download $1 left no .deb in $OUT/debs"
  fi
  echo "$f"
}
KDEB=$(fetch "linux-image-$KVER")
NDEB=$(fetch nbd-client)

# --- up to date? -------------------------------------------------------------------------------
inputs() {
  sha256sum "$HERE"/build-guest.sh "$HERE"/init
  basename "$KDEB"; basename "$NDEB"
  for b in "$BUSYBOX" "$(command -v socat)" "$(command -v mke2fs)"; do ls -l --time-style=+%s "$(readlink -f "$b")"; done
}
STAMP=$(inputs | sha256sum | cut -c1-64)
if [ -s "$OUT"/vmlinux ] && [ -s "$OUT"/initramfs.cpio ] && [ "$(cat "$OUT"/stamp 2>/dev/null)" = "$STAMP" ]; then
  echo "build-guest.sh: up to date ($KVER)" >&2
  echo "vmlinux=$OUT/vmlinux"; echo "initramfs=$OUT/initramfs.cpio"
  exit 0
fi
rm -f "$OUT"/stamp

# --- unpack ------------------------------------------------------------------------------------
K=$OUT/kernel; N=$OUT/nbd-client
rm -rf "$K" "$N"; mkdir -p "$K" "$N"
dpkg -x "$KDEB" "$K" || die "cannot unpack $KDEB (delete it to download it again)"
dpkg -x "$NDEB" "$N" || die "cannot unpack $NDEB (delete it to download it again)"
MODVER=$(cd "$K"/lib/modules && ls)
[ -f "$K/boot/vmlinuz-$MODVER" ] || die "$KDEB has no boot/vmlinuz-$MODVER"
NBDC=""
for c in "$N"/sbin/nbd-client "$N"/usr/sbin/nbd-client; do [ -x "$c" ] && NBDC=$c && break; done
[ -n "$NBDC" ] || die "$NDEB has no sbin/nbd-client"

# Debian's bzImage carries a compressed kernel (XZ up to 6.1, zstd in 6.12). qemu boots the plain
# ELF through its PVH note, which skips SeaBIOS's bzImage loader and the in-guest decompression
# (seconds under TCG). If it cannot be extracted, boot the bzImage itself (slower).
VMLINUZ=$K/boot/vmlinuz-$MODVER
at() { (grep -obUaP "$1" "$VMLINUZ" || true) | head -1 | cut -d: -f1; }
is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }
rm -f "$OUT"/vmlinux.tmp
if off=$(at '\xfd7zXZ\x00') && [ -n "$off" ]; then
  { tail -c +$((off + 1)) "$VMLINUZ" || true; } | xz -dc --single-stream > "$OUT"/vmlinux.tmp || true
elif off=$(at '\x28\xb5\x2f\xfd') && [ -n "$off" ] && command -v zstd >/dev/null; then
  # zstd stops at the end of the frame but complains about the bytes after it
  { tail -c +$((off + 1)) "$VMLINUZ" || true; } | zstd -dcq 2>/dev/null > "$OUT"/vmlinux.tmp || true
fi
if [ -s "$OUT"/vmlinux.tmp ] && is_elf "$OUT"/vmlinux.tmp; then
  KIND="vmlinux (PVH)"
else
  echo "build-guest.sh: cannot extract an ELF vmlinux from $VMLINUZ; booting the bzImage (slower)" >&2
  cp "$VMLINUZ" "$OUT"/vmlinux.tmp
  KIND="bzImage"
fi

# --- root file system --------------------------------------------------------------------------
R=$OUT/rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib64,proc,sys,dev,run,tmp,mnt,etc,modules}
cp "$BUSYBOX" "$R"/bin/busybox
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
done

add_elf() { # add_elf HOSTPATH DESTDIR: the binary and every shared library it needs
  cp -L "$1" "$R/$2/"
  local missing
  missing=$(ldd "$1" | awk '/not found/ {print $1}')
  [ -z "$missing" ] || die "$(basename "$1") needs libraries the host lacks: $missing"
  ldd "$1" | grep -oE '/[^ ]+\.so[^ ]*' | while read -r lib; do
    [ -e "$R$lib" ] && continue
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
}
add_elf "$NBDC" sbin
add_elf "$(command -v socat)" bin
add_elf "$(command -v mke2fs)" sbin
rm -f "$R"/bin/mkfs.ext2 "$R"/bin/mke2fs     # busybox's applets would shadow the real mke2fs
ln -s mke2fs "$R"/sbin/mkfs.ext4
cp /etc/mke2fs.conf "$R"/etc/

# Modules and their dependencies, in load order. nbd gets its parameters here (one device is
# enough; no partition scan).
depmod -b "$K" "$MODVER"
: > "$R"/modules.order
for m in virtio_pci virtio_console nbd ext4; do
  modprobe -d "$K" -S "$MODVER" -C /dev/null --show-depends "$m" | while read -r kind path _; do
    [ "$kind" = insmod ] || continue          # "builtin X" needs nothing
    b=$(basename "$path" .xz)                 # newer Debian kernels ship .ko.xz
    [ -e "$R/modules/$b" ] && continue
    case "$path" in
      *.ko) cp "$path" "$R/modules/$b" ;;
      *.ko.xz) xz -dc "$path" > "$R/modules/$b" ;;
      *) die "module $path: busybox insmod needs plain or .xz modules" ;;
    esac
    case "$b" in nbd.ko*) args="nbds_max=1 max_part=0";; *) args="";; esac
    echo "/modules/$b $args" >> "$R"/modules.order
  done
done
grep -q '/nbd\.ko' "$R"/modules.order || die "no nbd module in $KDEB"

install -m 0755 "$HERE"/init "$R"/init
(cd "$R" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) > "$OUT"/initramfs.cpio.tmp
mv "$OUT"/vmlinux.tmp "$OUT"/vmlinux
mv "$OUT"/initramfs.cpio.tmp "$OUT"/initramfs.cpio
echo "$STAMP" > "$OUT"/stamp
echo "build-guest.sh: built kernel $MODVER as $KIND, initramfs $(du -h "$OUT"/initramfs.cpio | cut -f1), modules: $(sed 's|/modules/||; s| .*||' "$R"/modules.order | tr '\n' ' ')" >&2
echo "vmlinux=$OUT/vmlinux"; echo "initramfs=$OUT/initramfs.cpio"
