#!/usr/bin/env bash
# Makes the EIF fixtures of tests/eif_build.rs with AWS's own builder, eif_build (the
# aws-nitro-enclaves-image-format crate's CLI, the code `nitro-cli build-enclave` uses), and
# records the measurements it reports:
#
#   cargo install eif_build --version 0.2.1 --locked
#   bash attestation-verifier/tests/eif/make_fixtures.sh
#
# The kernel and ramdisks are deterministic filler (an EIF's measurements depend only on the
# bytes of its sections, not on what they mean), kept small so the fixtures can be committed.
# One image is unsigned; the other is signed with a fresh P-384 certificate, so it has PCR8.
set -euo pipefail
cd "$(dirname "$0")"
EIF_BUILD=${EIF_BUILD:-eif_build}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import hashlib, sys
out = sys.argv[1]
def filler(name, size):
    data, block = b"", hashlib.sha256(name.encode()).digest()
    while len(data) < size:
        block = hashlib.sha256(block).digest()
        data += block
    open(f"{out}/{name}", "wb").write(data[:size])
filler("bzImage", 12_345)
open(f"{out}/bzImage.config", "w").write(
    "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86 4.14.256 Kernel Configuration\n#\n"
    + "".join(f"CONFIG_FIXTURE_{i}=y\n" for i in range(40)))
filler("init.cpio", 20_000)
filler("user.cpio", 33_333)
PY

common=(--kernel "$work/bzImage" --kernel_config "$work/bzImage.config"
        --cmdline "reboot=k panic=30 pci=off nomodule console=ttyS0 quiet"
        --ramdisk "$work/init.cpio" --ramdisk "$work/user.cpio"
        --build-time 2026-01-01T00:00:00+00:00)

"$EIF_BUILD" "${common[@]}" --output unsigned.eif | sed -n '/^{/,$p' > unsigned.measurements.json

openssl ecparam -name secp384r1 -genkey -noout -out "$work/key.pem"
openssl req -new -x509 -key "$work/key.pem" -sha384 -days 3650 -subj "/CN=eif fixture signer" \
    -out "$work/cert.pem"
"$EIF_BUILD" "${common[@]}" --signing-certificate "$work/cert.pem" --private-key "$work/key.pem" \
    --output signed.eif | sed -n '/^{/,$p' > signed.measurements.json
ls -l ./*.eif ./*.json
