#!/usr/bin/env bash
# Builds the enclave image without Docker or nitro-cli: state/local/enclave.eif and its
# measurements (state/local/enclave.eif.json, from `attestation-verifier measure --eif`).
#
#   kernel   Debian's cloud kernel (bookworm-backports: 6.12 has the NSM driver; bookworm's 6.1
#            does not), its config, and the modules the image loads (virtio-mmio, vsock, nsm),
#            decompressed. AWS's own enclave kernel is not downloadable here, so PCR1 (kernel,
#            command line, bootstrap ramdisk) differs from an image nitro-cli builds.
#   binaries `enclave` and `enclave-init`, release, statically linked as enclave/Dockerfile
#            builds them (glibc with +crt-static, no build id, paths remapped).
#   ramdisks `enclave-image` (image/): nitro-cli's layout, deterministic.
#   EIF      `eif_build` (crates.io, AWS's image-format crate's CLI, the code nitro-cli uses), with
#            a fixed build time.
#
# Two runs from the same commit and the same kernel package give the same EIF, hence the same
# PCR0/1/2; the kernel package is named in the output (Debian replaces it with security updates).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/scripts/qemu/backports.sh"
cd "$root"
kdir=${KERNEL_DIR:-$root/state/qemu/kernel}
out=${EIF_OUT:-$root/state/local/enclave.eif}
tools=${TOOLS_DIR:-$root/state/tools}
target=x86_64-unknown-linux-gnu
build_time=1970-01-01T00:00:00+00:00
# AWS's command line (aws-nitro-enclaves-sdk-bootstrap, kernel/cmdline/x86_64.cmdline) without
# `nomodules` (this image's modules are loaded by its init). What Debian's kernel needs under
# QEMU's machine model is appended at run time by scripts/qemu/run-qemu.sh.
cmdline="reboot=k panic=30 pci=off console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on"
# The modules the image's init loads, in this order (dependencies first; enclave-image writes
# it to modules/order): this kernel has virtio-mmio, vsock and the NSM driver as modules.
modules=(virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport nsm)

sudo=; [[ $(id -u) == 0 ]] || sudo=sudo

# --- the kernel ---------------------------------------------------------------------------
if [[ ! -e $kdir/package ]]; then
    backports linux-image-cloud-amd64
    meta=$(apt-cache policy linux-image-cloud-amd64 | awk '/bpo12/ && !/Installed|Candidate/ {print $1; exit}')
    pkg=$(apt-cache depends "linux-image-cloud-amd64=$meta" | awk '/Depends: linux-image-6/ {print $2; exit}')
    [[ -n $pkg ]] || { echo "build-eif: no backports cloud kernel found" >&2; exit 1; }
    rm -rf "$kdir" && mkdir -p "$kdir/deb" "$kdir/modules"
    # apt checks the package against the signed archive index as it downloads it.
    (cd "$kdir/deb" && apt-get download -q "$pkg" 2>&1 | grep -v unsandboxed || true)
    deb=$(ls "$kdir"/deb/*.deb)
    dpkg-deb -x "$deb" "$kdir/x"
    cp "$kdir"/x/boot/vmlinuz-* "$kdir/bzImage"
    cp "$kdir"/x/boot/config-* "$kdir/bzImage.config"
    for m in "${modules[@]}"; do
        f=$(find "$kdir/x/lib/modules" -name "$m.ko.xz" -o -name "$m.ko" | head -1)
        [[ -n $f ]] || { echo "build-eif: $pkg has no $m module" >&2; exit 1; }
        case $f in *.xz) xz -dc "$f" > "$kdir/modules/$m.ko" ;; *) cp "$f" "$kdir/modules/$m.ko" ;; esac
    done
    rm -rf "$kdir/x"
    echo "$(basename "$deb") $(sha256sum "$deb" | cut -d' ' -f1)" > "$kdir/package"
fi
echo "build-eif: kernel $(cat "$kdir/package")"

# --- eif_build ----------------------------------------------------------------------------
if [[ ! -x $tools/bin/eif_build ]]; then
    dpkg -s libssl-dev >/dev/null 2>&1 || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libssl-dev pkg-config
    cargo install -q eif_build --version 0.2.1 --locked --root "$tools"
fi

# --- the static binaries ------------------------------------------------------------------
cargo_home=${CARGO_HOME:-$HOME/.cargo}
RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,--build-id=none --remap-path-prefix=$root=. --remap-path-prefix=$cargo_home=cargo" \
SOURCE_DATE_EPOCH=0 \
    cargo build --release --locked -p enclave -p enclave-init --target "$target"
bin=target/$target/release
cargo build -q --release --locked -p enclave-image -p attestation-verifier

# --- ramdisks and the EIF -----------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
strip -o "$work/enclave" "$bin/enclave"
strip -o "$work/init" "$bin/enclave-init"
guardrails=$(awk -F= '/^ARG GUARDRAILS_POLICY=/ {print $2}' enclave/Dockerfile)
module_args=(); for m in "${modules[@]}"; do module_args+=(--module "$kdir/modules/$m.ko"); done
target/release/enclave-image --init "$work/init" "${module_args[@]}" \
    --enclave "$work/enclave" --guardrails "$guardrails" --dockerfile enclave/Dockerfile --out "$work"
mkdir -p "$(dirname "$out")"
"$tools/bin/eif_build" --kernel "$kdir/bzImage" --kernel_config "$kdir/bzImage.config" \
    --cmdline "$cmdline" --ramdisk "$work/bootstrap.cpio" --ramdisk "$work/customer.cpio" \
    --name enclave --build-time "$build_time" --output "$out.tmp" > "$work/eif_build.json"
mv "$out.tmp" "$out"
target/release/attestation-verifier measure --eif "$out" > "$out.json"
# eif_build prints the PCRs it computed; ours must agree with them.
python3 - "$work/eif_build.json" "$out.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
theirs = json.loads(text[text.index("{"):])
ours = json.load(open(sys.argv[2]))["Measurements"]
for k in ("PCR0", "PCR1", "PCR2"):
    t, o = theirs[k], ours[k]
    if t != o:
        sys.exit(f"build-eif: {k}: eif_build says {t}, measure --eif says {o}")
PY
echo "build-eif: $out ($(stat -c %s "$out") bytes)"
cat "$out.json"
