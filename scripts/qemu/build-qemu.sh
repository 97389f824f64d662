#!/usr/bin/env bash
# Builds QEMU's `nitro-enclave` machine (an emulated AWS Nitro Enclave: boots an EIF, measures
# it into PCR0/1/2 as Nitro does, virtio-nsm, vhost-user vsock) with our patches
# (scripts/qemu/*.patch, applied in name order: virtio-nsm-signing.patch makes its NSM sign
# attestation documents ES384 with a chain local mode issues, `-global
# virtio-nsm-device.signing-key=…,certificate=…,cabundle=…`; upstream's are unsigned), into
# state/qemu/bin/qemu-system-x86_64.
#
# Debian's own QEMU packages are built without libcbor, so without this machine. The source is
# Debian's (bookworm-backports, QEMU 10.0.2, `apt-get source`: apt checks it against the signed
# archive index), configured with this machine only (`--without-default-devices`): about five
# minutes on two cores. Idempotent: nothing is done when the binary of this patch level exists.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/scripts/qemu/backports.sh"
out=${QEMU_STATE:-$root/state/qemu}
version=1:10.0.2+ds-2+deb13u1~bpo12+1
upstream=10.0.2
patches=("$root"/scripts/qemu/*.patch)
[[ -e ${patches[0]} ]] || patches=()
stamp=$out/bin/.built-$(cat "$0" "${patches[@]}" | sha256sum | cut -c1-16)
if [[ -x $out/bin/qemu-system-x86_64 && -e $stamp ]]; then
    exit 0
fi

sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
# bookworm-backports: the QEMU source and a meson new enough for it (QEMU 10 needs >= 1.5).
backports meson
need=(build-essential ninja-build pkg-config flex bison python3-venv libglib2.0-dev
      libfdt-dev libcbor-dev libgnutls28-dev zlib1g-dev libpixman-1-dev xz-utils)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! dpkg -s meson 2>/dev/null | grep -q '^Version: 1\.[5-9]' || ! dpkg -s python3-pycotap >/dev/null 2>&1; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t bookworm-backports meson python3-pycotap
fi

mkdir -p "$out/src"
cd "$out/src"
tarball=qemu_${upstream}+ds.orig.tar.xz
if [[ ! -e $tarball ]]; then
    # The upstream tarball is all we use (Debian's packaging patches are for its packages).
    apt-get source -q --download-only "qemu=$version" || true
    [[ -e $tarball ]] || { echo "build-qemu: could not download $tarball" >&2; exit 1; }
fi
rm -rf "qemu-$upstream" build
tar -xJf "$tarball"
cd "qemu-$upstream"
for p in "${patches[@]}"; do patch -p1 --forward < "$p"; done
# Debian's +ds tarball leaves out the prebuilt firmware (Debian packages it separately), which
# QEMU's build would unpack for x86_64: this machine needs only the microvm BIOS and the
# linuxboot option ROM, taken from Debian's packages below.
sed -i 's/^    unpack_edk2_blobs = bzip2.found()$/    unpack_edk2_blobs = false/' meson.build
grep -q '^    unpack_edk2_blobs = false$' meson.build
# This machine and what it selects, nothing else.
printf 'CONFIG_NITRO_ENCLAVE=y\n' > configs/devices/x86_64-softmmu/nitro.mak
mkdir -p ../build && cd ../build
# Debian's python3: its meson and pycotap are the ones QEMU's build venv looks for.
../qemu-$upstream/configure --prefix="$out" --python=/usr/bin/python3 --target-list=x86_64-softmmu \
    --without-default-devices --with-devices-x86_64=nitro \
    --disable-download --disable-docs --disable-user --disable-tools --disable-guest-agent \
    --disable-werror --disable-install-blobs --enable-gnutls --enable-fdt=system \
    --disable-sdl --disable-gtk --disable-vnc --disable-opengl --disable-spice --disable-curses \
    --disable-slirp --disable-libusb --disable-usb-redir --disable-xkbcommon --disable-rust
# The emulator alone (the default target also builds QEMU's test programs: twice the time).
ninja qemu-system-x86_64
mkdir -p "$out/bin"
rm -f "$out"/bin/.built-*
install -m 0755 qemu-system-x86_64 "$out/bin/qemu-system-x86_64"
# Firmware (run-qemu.sh passes -L state/qemu/share/qemu): the microvm BIOS (SeaBIOS's microvm
# build, for the machine with ACPI, which Debian's kernel needs to find the virtio-mmio devices)
# and the option ROM that loads the kernel through fw_cfg. Extracted, not installed:
# qemu-system-data would conflict with the system's QEMU packages.
fw=$(mktemp -d)
(cd "$fw" && apt-get download -q seabios qemu-system-data 2>&1 | grep -v unsandboxed || true)
for deb in "$fw"/*.deb; do dpkg-deb -x "$deb" "$fw/x"; done
mkdir -p "$out/share/qemu"
install -m 0644 "$fw/x/usr/share/seabios/bios-microvm.bin" "$fw/x/usr/share/qemu/linuxboot_dma.bin" \
    "$out/share/qemu/"
rm -rf "$fw"
touch "$stamp"
[[ $("$out/bin/qemu-system-x86_64" -machine help) == *nitro-enclave* ]]
[[ $("$out/bin/qemu-system-x86_64" -device virtio-nsm-device,help 2>&1) == *signing-key* ]]
echo "build-qemu: $out/bin/qemu-system-x86_64 (nitro-enclave machine, signing NSM)"
