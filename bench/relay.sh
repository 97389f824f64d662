#!/usr/bin/env bash
# `make bench-relay`: what the relay costs (DESIGN.md §3), measured on loopback.
#  1. Latency added to a small request: p50/p99 through `host serve` against the same request
#     sent straight to the enclave socket (relay_bench latency).
#  2. Throughput of small requests with wrk: `host serve` in front of an echo enclave (our
#     framing, one Unix connection per request), against nginx proxying the same echo over
#     HTTP/1.1 on a Unix socket (keep-alive upstream connections, no buffering), same run,
#     same machine, alternated.
# Installs wrk and nginx from Debian when they are missing. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${STATE:-state}/bench-relay
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
# Many short alternated rounds: on a noisy shared machine one round can move ±20%, and the
# median of many is what is stable.
ROUNDS=${ROUNDS:-20}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
    echo "installing wrk and nginx-light from Debian" >&2
    apt-get install -y -q wrk nginx-light >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q wrk nginx-light >/dev/null; }
fi

cargo build --release --locked -p host --bin host -p tests --example relay_bench >&2
B=target/release

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

$B/examples/relay_bench upstream --framed "$STATE/enclave.sock" --http "$STATE/upstream.sock" 2>"$STATE/upstream.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$STATE/upstream.sock" ] && break; sleep 0.1; done

# The relay: limits that a load test on one client IP would trip are opened up. Both servers
# log every request to a file (the relay's default text format, nginx's access log).
$B/host serve --listen 127.0.0.1:18080 --enclave "unix:$STATE/enclave.sock" \
    --rate-per-second 1000000000 --rate-burst 1000000000 --max-in-flight 100000 --max-in-flight-per-client 100000 \
    2>"$STATE/relay.log" &
pids+=($!)

cat >"$STATE/nginx.conf" <<CONF
user root;
worker_processes 2;
pid $STATE/nginx.pid;
error_log $STATE/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log $STATE/nginx-access.log;
    client_body_temp_path $STATE/nginx-body;
    proxy_temp_path $STATE/nginx-proxy;
    upstream echo { server unix:$STATE/upstream.sock; keepalive 128; }
    server {
        listen 127.0.0.1:18081;
        location /v1/ohttp {
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
CONF
nginx -c "$STATE/nginx.conf" -g 'daemon off;' &
pids+=($!)

for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:18080/readyz >/dev/null || { echo "relay not ready; see $STATE/relay.log" >&2; exit 1; }

cat >"$STATE/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 256)
wrk.headers["Content-Type"] = "message/ohttp-chunked-req"
LUA
# Both answer with the echoed body.
[ "$(curl -s -X POST -H 'content-type: message/ohttp-chunked-req' --data-binary abc http://127.0.0.1:18081/v1/ohttp)" = abc ]
[ "$(curl -s -X POST -H 'content-type: message/ohttp-chunked-req' --data-binary abc http://127.0.0.1:18080/v1/ohttp)" = abc ]

echo "latency (sequential, 256-byte body):" >&2
$B/examples/relay_bench latency --relay 127.0.0.1:18080 --direct "$STATE/enclave.sock" --n 5000 | tee "$STATE/latency.json"

run() { # name port
    wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$STATE/post.lua" "http://127.0.0.1:$2/v1/ohttp" >"$STATE/wrk-$1.txt"
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' "$STATE/wrk-$1.txt")
    p50=$(awk '$1 == "50%" {print $2}' "$STATE/wrk-$1.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$STATE/wrk-$1.txt")
    if grep -q "Non-2xx" "$STATE/wrk-$1.txt"; then echo "$1: non-2xx answers" >&2; cat "$STATE/wrk-$1.txt" >&2; exit 1; fi
    echo "{\"server\":\"$1\",\"requests_per_s\":$rps,\"p50\":\"$p50\",\"p99\":\"$p99\"}"
}
echo "throughput (wrk, 2 threads, $CONNS connections, ${DURATION}s, 256-byte POST):" >&2
for _ in $(seq "$ROUNDS"); do
    run nginx 18081
    run relay 18080
done | tee "$STATE/throughput.jsonl"
python3 - "$STATE/throughput.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
# Rounds alternate nginx then relay: compare each pair, then take the median pair.
pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
rps = [o["requests_per_s"] / n["requests_per_s"] for n, o in pairs]
p99 = [ms(o["p99"]) / ms(n["p99"]) for n, o in pairs]
print("per round, relay/nginx requests/s: " + ", ".join(f"{r:.2f}x" for r in rps))
print("per round, relay/nginx p99:        " + ", ".join(f"{r:.2f}x" for r in p99))
print(f"rounds at or above nginx: {sum(r >= 1.0 for r in rps)} of {len(rps)} for requests/s, "
      f"{sum(r <= 1.0 for r in p99)} of {len(p99)} for p99")
print(f"median: {statistics.median(rps):.2f}x requests/s, {statistics.median(p99):.2f}x p99 "
      f"(relay {statistics.median(o['requests_per_s'] for _, o in pairs):.0f} req/s, "
      f"nginx {statistics.median(n['requests_per_s'] for n, _ in pairs):.0f} req/s)")
PY
