#!/usr/bin/env bash
# Builds vhost-device-vsock (rust-vmm, crates.io), the vhost-user vsock backend QEMU's
# nitro-enclave machine talks to, with the parent at CID 3: an enclave's parent instance is
# always CID 3 (the init's heartbeat and the enclave's KMS proxy dial it), and the crate
# hard-codes the host as CID 2 (`VSOCK_HOST_CID` in src/vhu_vsock.rs). One constant changes;
# the crate's own Cargo.lock is used. Into state/tools/bin/vhost-device-vsock.
#
# Only its Unix-socket backend (`uds-path`, hybrid vsock: the host connects to the socket and
# sends `CONNECT <port>`; guest connections to port P arrive on `<uds-path>_P`) is used: its
# `forward-cid` mode would reach this machine's real vsock, which belongs to its own host.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tools=${TOOLS_DIR:-$root/state/tools}
version=0.3.0
if [[ -x $tools/bin/vhost-device-vsock && -e $tools/bin/.vhost-device-vsock-$version-cid3 ]]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The crate's source through cargo (checksummed against the crates.io index).
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-vhost-device-vsock"
version = "0.0.0"
edition = "2021"
[dependencies]
vhost-device-vsock = "=$version"
TOML
echo 'fn main() {}' > "$work/fetch/src/main.rs"
# Cargo downloads and unpacks it, then leaves it out of the build (a binary-only crate).
cargo fetch -q --manifest-path "$work/fetch/Cargo.toml" 2>/dev/null
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/vhost-device-vsock-$version 2>/dev/null | head -1)
[[ -n $src ]] || { echo "build-vsock: cargo did not fetch vhost-device-vsock $version" >&2; exit 1; }
cp -r "$src" "$work/vsock"
file=$work/vsock/src/vhu_vsock.rs
sed -i 's/^pub(crate) const VSOCK_HOST_CID: u64 = 2;$/pub(crate) const VSOCK_HOST_CID: u64 = 3;/' "$file"
grep -q '^pub(crate) const VSOCK_HOST_CID: u64 = 3;$' "$file" || {
    echo "build-vsock: vhost-device-vsock $version no longer declares VSOCK_HOST_CID as expected" >&2
    exit 1
}
cargo install -q --locked --path "$work/vsock" --root "$tools"
touch "$tools/bin/.vhost-device-vsock-$version-cid3"
echo "build-vsock: $tools/bin/vhost-device-vsock (parent CID 3)"
