#!/usr/bin/env bash
# Runs the enclave image (state/local/enclave.eif, scripts/qemu/build-eif.sh) in QEMU's
# nitro-enclave machine, as `nitro-cli run-enclave` runs it on a Nitro instance:
#
#   vsock    vhost-device-vsock (scripts/qemu/build-vsock.sh) with the parent at CID 3, its Unix
#            socket backend at $DIR/vsock.sock: the host reaches the enclave's port P with
#            `hvsock:$DIR/vsock.sock:P`, and the enclave's connections to the parent's port P
#            arrive on $DIR/vsock.sock_P.
#   boot     nitro-cli's heartbeat: the image's init sends 0xB7 to 3:9000 once its modules are
#            loaded; this script answers it and reports the boot. Under TCG an occasional boot
#            hangs before that, so a boot that has not sent it within BOOT_TIMEOUT seconds is
#            retried once.
#   NSM      QEMU's virtio-nsm with our signing patch, its chain issued by the local mock CA
#            ($CA, `mock-ca nsm-signer`), so mock-kms and clients that trust that root verify
#            its documents; PCR0/1/2 are the EIF's, computed by QEMU as Nitro does.
#
#   run-qemu.sh DIR [MEMORY_MIB] [CPUS]     (foreground; Ctrl-C or TERM stops QEMU and the backend)
#
# Environment: EIF (state/local/enclave.eif), CA (state/local/mock-ca), QEMU
# (state/qemu/bin/qemu-system-x86_64), VSOCK (state/tools/bin/vhost-device-vsock),
# BOOT_TIMEOUT (120), ENCLAVE_CID (16).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:?usage: run-qemu.sh DIR [MEMORY_MIB] [CPUS]}
mem=${2:-1024}
cpus=${3:-2}
eif=${EIF:-$root/state/local/enclave.eif}
ca=${CA:-$root/state/local/mock-ca}
qemu=${QEMU:-$root/state/qemu/bin/qemu-system-x86_64}
vsock=${VSOCK:-$root/state/tools/bin/vhost-device-vsock}
firmware=${FIRMWARE:-$root/state/qemu/share/qemu}
mockca=${MOCK_CA_BIN:-$root/target/release/mock-ca}
boot_timeout=${BOOT_TIMEOUT:-120}
cid=${ENCLAVE_CID:-16}
for f in "$eif" "$qemu" "$vsock" "$mockca"; do
    [[ -e $f ]] || { echo "run-qemu: $f is missing" >&2; exit 1; }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pids=()
stop() {
    trap - EXIT INT TERM
    ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM

"$mockca" init "$ca" >/dev/null
"$mockca" nsm-signer "$ca" "$dir/nsm" >/dev/null

# Appended to the EIF's command line by QEMU (not measured: PCR1 is the EIF's), for Debian's
# kernel on this machine model: ACPI describes the virtio-mmio devices (the kernel has no
# command-line virtio-mmio devices) but gives the PIT no interrupt override, so the timer must
# come from the local APIC in TSC-deadline mode, which needs the TSC's frequency: under TCG the
# guest's TSC is the host's, whose frequency the host's kernel measured.
tsc_khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
append="acpi=on cgroup_disable=cpuset,memory${tsc_khz:+ tsc_early_khz=$tsc_khz}"

boot() {
    local attempt=$1
    rm -f "$dir"/vsock.sock* "$dir/vhost.sock" "$dir/booted"
    "$vsock" --vm "guest-cid=$cid,socket=$dir/vhost.sock,uds-path=$dir/vsock.sock" \
        >"$dir/vhost-device-vsock.log" 2>&1 &
    pids+=($!)
    # nitro-cli's side of the heartbeat: one byte back for the one byte the init sends.
    python3 - "$dir/vsock.sock_9000" "$dir/booted" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
c, _ = s.accept()
if c.recv(1) == b"\xb7":
    c.sendall(b"\xb7")
    open(sys.argv[2], "w").close()
c.close()
PY
    pids+=($!)
    for _ in $(seq 50); do [[ -S $dir/vhost.sock ]] && break; sleep 0.1; done
    "$qemu" -M "nitro-enclave,vsock=vsock,id=qemu-enclave,acpi=on" -kernel "$eif" -append "$append" \
        -m "$mem" -smp "$cpus" -cpu max -nographic -no-reboot -L "$firmware" \
        -chardev "socket,id=vsock,path=$dir/vhost.sock" \
        -global "virtio-nsm-device.signing-key=$dir/nsm/signing-key.pem" \
        -global "virtio-nsm-device.certificate=$dir/nsm/certificate.pem" \
        -global "virtio-nsm-device.cabundle=$dir/nsm/cabundle.pem" \
        >"$dir/console-$attempt.log" 2>&1 </dev/null &
    qemu_pid=$!
    pids+=($qemu_pid)
    for ((i = 0; i < boot_timeout * 5; i++)); do
        [[ -e $dir/booted ]] && return 0
        kill -0 "$qemu_pid" 2>/dev/null || { echo "run-qemu: QEMU exited; console:" >&2; tail -n 30 "$dir/console-$attempt.log" >&2; return 1; }
        sleep 0.2
    done
    echo "run-qemu: no heartbeat after ${boot_timeout}s (attempt $attempt)" >&2
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pids=()
    return 1
}
boot 1 || boot 2 || exit 1
echo "run-qemu: enclave booted (CID $cid); host endpoint hvsock:$dir/vsock.sock:5000; console $dir/console-*.log"
wait "$qemu_pid"
