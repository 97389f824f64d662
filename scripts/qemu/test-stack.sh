#!/usr/bin/env bash
# `make test-qemu` (CI runs it after `make test`): the whole stack on the real enclave image in
# QEMU's nitro-enclave machine, started as `ENCLAVE=qemu make run` starts it (scripts/run-local.sh,
# its own state and ports, the host-side binaries `make test` built), then used as a user would:
#
#   1. `GET /v1/attestation?fresh=1` through the verifying proxy: verified, signed by QEMU's
#      NSM (module id `qemu-enclave`, not the mock's), PCR0/1/2 equal to what
#      `attestation-verifier measure --eif` computes from the image file, the configuration
#      digest the one `enclave --print-config` prints;
#   2. a question with a known answer through the OpenAI SDK, streamed, greedy;
#   3. stopping the stack (TERM, as Ctrl-C) stops QEMU and the vsock backend too.
#
# QEMU, vhost-device-vsock and the EIF are built first when missing (reused when present).
# Under TCG the answer takes about a minute; the whole run a few minutes once built.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bin=${BIN:-target/debug}
model_name=smollm2
state=$(mktemp -d /tmp/qemu-stack.XXXXXX)
log=$state/run.log
t0=$SECONDS
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
proxy=127.0.0.1:$(free_port) relay=127.0.0.1:$(free_port) kms=127.0.0.1:$(free_port)

run_pid=
finish() {
    local rc=$?
    trap - EXIT
    if [[ -n $run_pid ]] && kill -0 "$run_pid" 2>/dev/null; then
        kill -TERM "$run_pid" 2>/dev/null || true
        wait "$run_pid" 2>/dev/null || true
    fi
    if ((rc != 0)); then
        echo "test-qemu: FAILED (exit $rc); the stack's output:" >&2
        tail -n 40 "$log" >&2 || true
        for f in "$state"/logs/*.log; do
            echo "--- $f" >&2
            tail -n 20 "$f" >&2 || true
        done
    else
        rm -rf "$state"
    fi
    exit "$rc"
}
trap finish EXIT

bash scripts/qemu/build-qemu.sh
bash scripts/qemu/build-vsock.sh
echo "test-qemu: tools ready after $((SECONDS - t0)) s; starting the stack in $state"

# The builds run-local.sh would make are `make test`'s (CARGO=true); the image is built by it
# (scripts/qemu/build-eif.sh) into this run's state.
ENCLAVE=qemu STATE=$state CARGO=true BIN=$bin PROXY=$proxy RELAY=$relay KMS=$kms \
    bash scripts/run-local.sh >"$log" 2>&1 &
run_pid=$!
t_start=$SECONDS
until grep -q '^==> 10/10 ready' "$log" 2>/dev/null; do
    if ! kill -0 "$run_pid" 2>/dev/null; then
        echo "test-qemu: the stack stopped before it was ready" >&2
        exit 1
    fi
    if ((SECONDS - t_start > 3600)); then
        echo "test-qemu: the stack was not ready within an hour" >&2
        exit 1
    fi
    sleep 1
done
echo "test-qemu: attested and serving after $((SECONDS - t_start)) s (image built, booted, provisioned)"
grep -E '^build-eif: kernel|^==> ' "$log" | sed 's/^/  /'

"$bin/attestation-verifier" measure --eif "$state/enclave.eif" >"$state/measured.json"
"$bin/enclave" --print-config | sed -n 's/^config_sha256 = "\(.*\)"$/\1/p' >"$state/config-sha256"
t_chat=$SECONDS
python3 - "$proxy" "$state/measured.json" "$state/config-sha256" "$model_name" <<'PY'
import json, sys, urllib.request
from openai import OpenAI

proxy, measured, config, model = sys.argv[1:]
with urllib.request.urlopen(f"http://{proxy}/v1/attestation?fresh=1", timeout=600) as r:
    facts = json.load(r)
expected = json.load(open(measured))["Measurements"]
failures = []
def check(what, got, want):
    if got != want:
        failures.append(f"{what}: got {got!r}, want {want!r}")
check("verified", facts.get("verified"), True)
check("module_id (QEMU's NSM signed the document)", facts.get("module_id"), "qemu-enclave")
for i in range(3):
    check(f"PCR{i} (measure --eif)", facts.get("pcrs", {}).get(str(i)), expected[f"PCR{i}"].lower())
check("config_sha256 (enclave --print-config)", facts.get("config_sha256"), open(config).read().strip())
if failures:
    sys.exit("test-qemu: attestation: " + "; ".join(failures))
print(f"test-qemu: attested: PCR0 {facts['pcrs']['0'][:16]}… = measure --eif, module {facts['module_id']}")

client = OpenAI(base_url=f"http://{proxy}/v1", api_key="unused", timeout=900, max_retries=0)
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    max_tokens=12,
    temperature=0,
    stream=True,
)
pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
text = "".join(pieces)
print(f"test-qemu: answer in {len([p for p in pieces if p])} pieces: {text!r}")
if "Paris" not in text:
    sys.exit(f"test-qemu: expected Paris in the answer, got {text!r}")
PY
echo "test-qemu: attestation and chat took $((SECONDS - t_chat)) s"

# Ctrl-C's path: the stack stops, QEMU and vhost-device-vsock with it.
kill -TERM "$run_pid"
wait "$run_pid" 2>/dev/null || true
run_pid=
for _ in $(seq 50); do
    pgrep -f -- "$state/" >/dev/null || break
    sleep 0.2
done
if pgrep -af -- "$state/"; then
    echo "test-qemu: processes of the stack outlived it (above)" >&2
    pkill -KILL -f -- "$state/" || true
    exit 1
fi
echo "test-qemu: passed in $((SECONDS - t0)) s"
