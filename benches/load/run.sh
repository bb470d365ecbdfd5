#!/usr/bin/env bash
# Whole-gateway load test (benches/README.md, "Whole-gateway load test").
#
# Builds upgate and upgate-bench (release), starts on free 127.0.0.1 ports: redis-server, the
# in-process S3 server (s3s-fs), the gateway (Redis store, S3 storage, one tenant whose rate
# limit never bites) and the bare hyper + one-EVALSHA baseline; runs every scenario, bounded in
# time and count, against loopback only; prints a Markdown report (ratios first) on stdout;
# stops everything it started on exit.
#
# Knobs (environment): DURATION (s per scenario, default 12), WARMUP (s, default 2),
# PART_MB (8), CONC_HIGH (64), CONC_LOW (16), REG_CONC (64), FLOW_CONC (8), FLOW_FILES (4),
# FLOW_FILE_SIZE (bytes, 20 MiB), MEM_SESSIONS (1000), MEM_FILES (10), FS_FILE_MB (256: the
# filesystem-storage uploads, in PART_MB parts), SKIP_BUILD=1,
# OUT (directory for the JSON results and logs; default a new /tmp/upgate-bench.XXXXXX),
# SCENARIOS (any of "parts register flow rtt mem fs hooks tus uppy"; default all of them),
# RATE_LIMIT (the tenant's rate_limit table; default one that is exercised but never limits),
# ALLOCATOR=mimalloc (build the gateway and the bench tool, baseline included, with mimalloc),
# CRED_ROUNDS (rounds of upload-token, JWT and API-key registration runs, default 3),
# WRK_THREADS (wrk's threads for the wrk-driven register runs, default 2; they run only when
# wrk is installed), WRK_ROUNDS (rounds of those runs, each the gateway, the baseline and the
# baseline with the gateway's script; default 3), GATEWAY_THREADS (the gateway's Tokio worker threads, through TOKIO_WORKER_THREADS; default:
# one per core), PINNED_PARTS=0 (skip the parts runs with the S3 server alone on one core).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-12}
WARMUP=${WARMUP:-2}
PART_MB=${PART_MB:-8}
CONC_HIGH=${CONC_HIGH:-64}
CONC_LOW=${CONC_LOW:-16}
REG_CONC=${REG_CONC:-64}
FLOW_CONC=${FLOW_CONC:-8}
FLOW_FILES=${FLOW_FILES:-4}
FLOW_FILE_SIZE=${FLOW_FILE_SIZE:-$((20 * 1024 * 1024))}
MEM_SESSIONS=${MEM_SESSIONS:-1000}
MEM_FILES=${MEM_FILES:-10}
SCENARIOS=${SCENARIOS:-parts register flow rtt mem fs hooks tus uppy}
RATE_LIMIT=${RATE_LIMIT:-"{ requests_per_second = 1000000, burst = 10000000 }"}
want() { case " $SCENARIOS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-$(mktemp -d /tmp/upgate-bench.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/upgate-bench-work.XXXXXX)
PART_SIZE=$((PART_MB * 1024 * 1024))

log() { echo "[run.sh] $*" >&2; }

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools -------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  log "redis-server not found: installing it with apt-get"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building upgate and upgate-bench (release) into $CARGO_TARGET_DIR"
  FEATURES=()
  if [ "${ALLOCATOR:-}" = mimalloc ]; then FEATURES=(--features upgate/mimalloc,upgate-bench/mimalloc); fi
  cargo build --release -p upgate -p upgate-bench "${FEATURES[@]}" >&2
fi
UPGATE="$CARGO_TARGET_DIR/release/upgate"
BENCH="$CARGO_TARGET_DIR/release/upgate-bench"

# A loopback port nobody listens on right now, below the kernel's ephemeral range: a port in
# that range can be taken as the local port of an outgoing connection between this check and
# the server's bind ("Address already in use"; it happened once to redis-server here).
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "${EPHEMERAL_LOW:-0}" -gt 12000 ] 2>/dev/null || EPHEMERAL_LOW=32768
free_port() {
  local p
  while :; do
    p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}
wait_port() { # port, name, pid
  local i
  for i in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then log "$2 exited during startup"; return 1; fi
    sleep 0.1
  done
  log "$2 did not listen on 127.0.0.1:$1"
  return 1
}

# --- servers -----------------------------------------------------------------------------
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  --logfile "$OUT/redis.log" &
PIDS+=($!)
REDIS_PID=$!
wait_port "$REDIS_PORT" redis-server "$REDIS_PID"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
RCLI=(redis-cli -h 127.0.0.1 -p "$REDIS_PORT")

mkdir -p "$WORK/s3tmp"
TMPDIR="$WORK/s3tmp" "$BENCH" s3-server --bucket bench-bucket >"$WORK/s3.env" 2>"$OUT/s3-server.log" &
PIDS+=($!)
S3_PID=$!
for _ in $(seq 1 100); do grep -q '^S3_ROOT=' "$WORK/s3.env" 2>/dev/null && break; sleep 0.1; done
grep -q '^S3_ROOT=' "$WORK/s3.env" || { log "s3-server did not start"; cat "$OUT/s3-server.log" >&2; exit 1; }
# shellcheck disable=SC1091
set -a; . "$WORK/s3.env"; set +a
export AWS_REGION="$S3_REGION" AWS_EC2_METADATA_DISABLED=true

# A bare user-space L4 forwarder in front of the S3 server: the reference for what any proxy
# on the byte path costs here (parts-presigned --via).
S3_HOSTPORT=${S3_ENDPOINT#http://}
"$BENCH" tcp-proxy --to "$S3_HOSTPORT" --buffer $((128 * 1024)) >"$WORK/proxy.env" 2>"$OUT/tcp-proxy.log" &
PIDS+=($!)
PROXY_PID=$!
for _ in $(seq 1 100); do grep -q '^PROXY_ADDR=' "$WORK/proxy.env" 2>/dev/null && break; sleep 0.1; done
PROXY_ADDR=$(sed -n 's/^PROXY_ADDR=//p' "$WORK/proxy.env")
[ -n "$PROXY_ADDR" ] || { log "tcp-proxy did not start"; cat "$OUT/tcp-proxy.log" >&2; exit 1; }
# The same with splice(2): no byte is copied into user space (the floor for any proxy).
"$BENCH" tcp-proxy --to "$S3_HOSTPORT" --buffer $((1024 * 1024)) --splice true >"$WORK/sproxy.env" 2>"$OUT/tcp-proxy-splice.log" &
PIDS+=($!)
SPROXY_PID=$!
for _ in $(seq 1 100); do grep -q '^PROXY_ADDR=' "$WORK/sproxy.env" 2>/dev/null && break; sleep 0.1; done
SPROXY_ADDR=$(sed -n 's/^PROXY_ADDR=//p' "$WORK/sproxy.env")
[ -n "$SPROXY_ADDR" ] || { log "tcp-proxy --splice did not start"; cat "$OUT/tcp-proxy-splice.log" >&2; exit 1; }

KEY="bench-$RANDOM$RANDOM$RANDOM"
KEY_HASH=$("$UPGATE" hash-key "$KEY")
GW_PORT=$(free_port)
ADMIN_PORT=$(free_port)
# An end user's JWT (EdDSA, signed here with openssl) for the JWT registration run: the
# tenant's JWK Set holds the public key.
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
openssl genpkey -algorithm ed25519 -out "$WORK/jwt-ed25519.pem" 2>/dev/null
JWT_X=$(openssl pkey -in "$WORK/jwt-ed25519.pem" -pubout -outform DER | tail -c 32 | b64url)
echo "{\"keys\":[{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"kid\":\"bench\",\"x\":\"$JWT_X\"}]}" >"$WORK/jwks.json"
JWT_HEAD=$(printf '%s' '{"alg":"EdDSA","kid":"bench","typ":"JWT"}' | b64url)
JWT_BODY=$(printf '{"iss":"https://auth.bench.example","sub":"bench-user","exp":%s}' "$(( $(date +%s) + 86400 ))" | b64url)
printf '%s' "$JWT_HEAD.$JWT_BODY" >"$WORK/jwt-signing-input"
JWT_SIG=$(openssl pkeyutl -sign -inkey "$WORK/jwt-ed25519.pem" -rawin -in "$WORK/jwt-signing-input" | b64url)
JWT="$JWT_HEAD.$JWT_BODY.$JWT_SIG"
cat >"$OUT/gateway.toml" <<EOF
# Generated by benches/load/run.sh
environment = "development"
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
redis_url = "$REDIS_URL"
storage = "s3://$S3_BUCKET"
part_size_mb = $PART_MB
reaper_interval_seconds = 3600   # keep the reaper out of the Redis round-trip counts
log_format = "json"

[s3]
endpoint = "$S3_ENDPOINT"
region = "$S3_REGION"
force_path_style = true

[[tenants]]
id = "bench"
api_keys_sha256 = ["$KEY_HASH"]
max_files_per_session = 1000000
session_ttl_seconds = { default = 3600, min = 60, max = 86400 }
rate_limit = $RATE_LIMIT
end_user_rate_limit = $RATE_LIMIT

max_concurrent_uploads = 4096

[tenants.jwt]
issuer = "https://auth.bench.example"
algorithms = ["EdDSA"]
keys_file = "$WORK/jwks.json"
EOF
if [ -n "${GATEWAY_THREADS:-}" ]; then export TOKIO_WORKER_THREADS=$GATEWAY_THREADS; fi
RUST_LOG=warn "$UPGATE" --config "$OUT/gateway.toml" >"$OUT/gateway.log" 2>&1 &
unset TOKIO_WORKER_THREADS
PIDS+=($!)
GW_PID=$!
wait_port "$GW_PORT" gateway "$GW_PID" || { tail -20 "$OUT/gateway.log" >&2; exit 1; }
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || { log "gateway not ready"; tail -20 "$OUT/gateway.log" >&2; exit 1; }

BL_PORT=$(free_port)
"$BENCH" baseline-server --listen "127.0.0.1:$BL_PORT" --redis "$REDIS_URL" >"$OUT/baseline.log" 2>&1 &
PIDS+=($!)
BL_PID=$!
wait_port "$BL_PORT" baseline-server "$BL_PID"
# The baseline again, running the gateway's own registration script: Redis then does the
# same work for both, and the wrk ratio against it is the gateway's own per-request cost.
BLS_PORT=$(free_port)
"$BENCH" baseline-server --listen "127.0.0.1:$BLS_PORT" --redis "$REDIS_URL" --script gateway \
  >"$OUT/baseline-gateway-script.log" 2>&1 &
PIDS+=($!)
wait_port "$BLS_PORT" baseline-server "$!"

GW="http://127.0.0.1:$GW_PORT"
BL="http://127.0.0.1:$BL_PORT"
BLS="http://127.0.0.1:$BLS_PORT"
COMMON=(--duration "$DURATION" --warmup "$WARMUP")
log "gateway $GW (pid $GW_PID, $(ls /proc/$GW_PID/task | wc -l) threads), baseline $BL, redis $REDIS_URL, s3 $S3_ENDPOINT; results in $OUT"

rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# Idle RSS: the freshly started gateway, before any load (the conservative baseline).
sleep 1
IDLE_KIB=$(rss_kib "$GW_PID" VmRSS)
# CPU seconds (user + system) a process spent so far, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# --- 1. register-file throughput: gateway vs the bare baseline ----------------------------
# First, on fresh processes and an empty Redis for both: run after the parts phase, the
# gateway (measured first) met the leftovers of that phase (its heap after 64 x 8 MiB
# uploads, Redis holding their keys) and the baseline did not (benches/README.md).
if want register; then
# CPU seconds (user + system) each process spent in the measured window (sampled after the
# warm-up and again DURATION s later), divided by the requests served in it: steadier than
# req/s on a shared 2-core machine.
register_run() { # label target server-pid [credential]
  local g0 r0 g1 r1 bpid
  "$BENCH" register --target "$2" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
    --credential "${4:-key}" --jwt "$JWT" --label "$1" --json-out "$OUT/register-$1.json" >/dev/null &
  bpid=$!
  sleep "$WARMUP"
  g0=$(cpu_ticks "$3"); r0=$(cpu_ticks "$REDIS_PID")
  sleep "$DURATION"
  g1=$(cpu_ticks "$3"); r1=$(cpu_ticks "$REDIS_PID")
  wait "$bpid"
  echo "{\"serverTicks\": $((g1 - g0)), \"redisTicks\": $((r1 - r0)), \"ticksPerSecond\": $(getconf CLK_TCK)}" \
    >"$OUT/register-$1-cpu.json"
}
log "register: gateway, concurrency $REG_CONC"
register_run gateway "$GW" "$GW_PID"
log "register: baseline, concurrency $REG_CONC"
register_run baseline "$BL" "$BL_PID"
# The same registrations with each session's upload token instead of the API key (what a
# browser sends) and with an end user's JWT, in CRED_ROUNDS rounds of token, JWT, API key:
# each credential run sits between two API-key runs and is compared with their mean, and the
# report gives the median over the rounds. Two runs with the same credential differ by up to
# ~25 % on these shared cores (benches/README.md), more than one pair of runs can resolve.
for round in $(seq 1 "${CRED_ROUNDS:-3}"); do
  log "register: round $round of ${CRED_ROUNDS:-3}: upload tokens, an end user's JWT, the API key; concurrency $REG_CONC"
  register_run "gateway-token-$round" "$GW" "$GW_PID" token
  register_run "gateway-jwt-$round" "$GW" "$GW_PID" jwt
  register_run "gateway-key-$round" "$GW" "$GW_PID"
done

# The same comparison driven by wrk (another load generator, written in C: it takes less of
# the shared cores than upgate-bench, so the ratio it gives is compressed less). One session
# each, every request a new fileName; WRK_THREADS threads, REG_CONC connections.
if command -v wrk >/dev/null 2>&1; then
  wrk_run() { # name base-url credential
    local sid
    # Each run starts on an empty Redis: a later run would otherwise meet the keys of the
    # ones before it (a larger keyspace, more rehashing) and come out slower for it.
    "${RCLI[@]}" flushall sync >/dev/null
    sid=$(curl -fsS -X POST "$2/v1/sessions" -H "Authorization: Bearer $3" \
      -H 'Content-Type: application/json' -d '{"maxFiles": 1000000}' | sed -n 's/.*"sessionId":"\([^"]*\)".*/\1/p')
    [ -n "$sid" ] || { log "wrk: no session from $2"; return 1; }
    wrk -t"${WRK_THREADS:-2}" -c"$REG_CONC" -d"${DURATION}s" --latency -s "$ROOT/benches/load/wrk-register.lua" \
      "$2/v1/sessions/$sid/files" -- "$3" >"$OUT/wrk-$1.txt"
    awk -F= '/^WRK_/ { v[$1] = $2 } END {
      printf "{\"reqPerSec\": %s, \"p50Ms\": %s, \"p99Ms\": %s, \"not201\": %s}\n",
        v["WRK_REQ_PER_SEC"], v["WRK_P50_MS"], v["WRK_P99_MS"], v["WRK_NOT_201"] }' \
      "$OUT/wrk-$1.txt" >"$OUT/wrk-register-$1.json"
  }
  log "register with wrk: gateway, the baseline, the baseline with the gateway's script; $REG_CONC connections"
  # Rounds, because two runs of one server differ by up to ~10 % here: the report compares
  # the means (and gives each round's ratio).
  for round in $(seq 1 "${WRK_ROUNDS:-3}"); do
    wrk_run "gateway-$round" "$GW" "$KEY"
    wrk_run "baseline-$round" "$BL" ""
    wrk_run "baseline-gateway-script-$round" "$BLS" ""
  done
else
  log "wrk not installed (apt-get install wrk): the wrk-driven register ratio is skipped"
fi

fi

# --- 2. proxied vs presigned parts at CONC_HIGH (RSS sampled), then CONC_LOW --------------
# One parts run (name concurrency subcommand extra-args...): the measured window's CPU of
# the S3 server, the gateway, the L4 proxy and the load generator goes to NAME-cpu.json.
parts_run() {
  local name=$1 conc=$2 cmd=$3
  shift 3
  local bpid s0 g0 p0 b0 s1 g1 p1 b1
  "$BENCH" "$cmd" --target "$GW" --key "$KEY" --concurrency "$conc" --part-size "$PART_SIZE" "${COMMON[@]}" \
    --json-out "$OUT/$name.json" "$@" >/dev/null &
  bpid=$!
  sleep "$WARMUP"
  s0=$(cpu_ticks "$S3_PID"); g0=$(cpu_ticks "$GW_PID"); b0=$(cpu_ticks "$bpid")
  p0=$(($(cpu_ticks "$PROXY_PID") + $(cpu_ticks "$SPROXY_PID")))
  sleep "$DURATION"
  s1=$(cpu_ticks "$S3_PID"); g1=$(cpu_ticks "$GW_PID"); b1=$(cpu_ticks "$bpid")
  p1=$(($(cpu_ticks "$PROXY_PID") + $(cpu_ticks "$SPROXY_PID")))
  wait "$bpid"
  echo "{\"s3Ticks\": $((s1 - s0)), \"gatewayTicks\": $((g1 - g0)), \"proxyTicks\": $((p1 - p0)), \"loadTicks\": $((b1 - b0)), \"seconds\": $DURATION, \"ticksPerSecond\": $(getconf CLK_TCK)}" \
    >"$OUT/$name-cpu.json"
}

if want parts; then
echo 5 >"/proc/$GW_PID/clear_refs" 2>/dev/null || true # resets VmHWM (peak RSS)
(
  max=0
  while kill -0 "$GW_PID" 2>/dev/null; do
    r=$(rss_kib "$GW_PID" VmRSS || echo 0)
    [ "${r:-0}" -gt "$max" ] && max=$r && echo "$max" >"$WORK/rss-max"
    sleep 0.05
  done
) &
SAMPLER=$!
PIDS+=($SAMPLER)
log "parts: proxied, $CONC_HIGH x $PART_MB MiB"
parts_run parts-c$CONC_HIGH "$CONC_HIGH" parts --label gateway
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
HWM_KIB=$(rss_kib "$GW_PID" VmHWM)
SAMPLED_KIB=$(cat "$WORK/rss-max" 2>/dev/null || echo 0)
PEAK_KIB=$((HWM_KIB > SAMPLED_KIB ? HWM_KIB : SAMPLED_KIB))
cat >"$OUT/rss.json" <<EOF
{"idleKiB": $IDLE_KIB, "peakKiB": $PEAK_KIB, "hwmKiB": $HWM_KIB, "sampledMaxKiB": $SAMPLED_KIB, "concurrency": $CONC_HIGH, "partSizeBytes": $PART_SIZE}
EOF
log "rss idle ${IDLE_KIB} KiB, peak ${PEAK_KIB} KiB (VmHWM ${HWM_KIB}, sampled ${SAMPLED_KIB})"

log "parts: presigned direct to S3, $CONC_HIGH x $PART_MB MiB"
parts_run presigned-c$CONC_HIGH "$CONC_HIGH" parts-presigned --label "s3 direct"
log "parts: presigned through the bare L4 proxies (copy, splice; reference), $CONC_HIGH x $PART_MB MiB"
parts_run l4proxy-c$CONC_HIGH "$CONC_HIGH" parts-presigned --via "$PROXY_ADDR" --label "s3 via L4 proxy"
parts_run l4splice-c$CONC_HIGH "$CONC_HIGH" parts-presigned --via "$SPROXY_ADDR" --label "s3 via splice L4 proxy"
log "parts: proxied, presigned and via the L4 proxy, $CONC_LOW x $PART_MB MiB"
parts_run parts-c$CONC_LOW "$CONC_LOW" parts --label gateway
parts_run presigned-c$CONC_LOW "$CONC_LOW" parts-presigned --label "s3 direct"
parts_run l4proxy-c$CONC_LOW "$CONC_LOW" parts-presigned --via "$PROXY_ADDR" --label "s3 via L4 proxy"
parts_run l4splice-c$CONC_LOW "$CONC_LOW" parts-presigned --via "$SPROXY_ADDR" --label "s3 via splice L4 proxy"

# The same proxied/presigned pairs with the S3 server alone on CPU 0 and everything else
# (gateway, Redis, proxies, the load generator: this shell's children) on CPU 1. Above, the
# S3 server (the bottleneck) shares both cores with whatever sits on the path, so the ratio
# measures the proxy's CPU taken from it; here storage has a core of its own, as a remote S3
# does, and the ratio measures whether the gateway limits the bytes (benches/README.md).
if [ "${PINNED_PARTS:-1}" = 1 ] && [ "$(getconf _NPROCESSORS_ONLN)" -ge 2 ] && command -v taskset >/dev/null; then
  OTHERS=("$GW_PID" "$REDIS_PID" "$PROXY_PID" "$SPROXY_PID" "$BL_PID" $$)
  taskset -acp 0 "$S3_PID" >/dev/null
  for pid in "${OTHERS[@]}"; do taskset -acp 1 "$pid" >/dev/null; done
  log "parts with the S3 server alone on CPU 0 (everything else on CPU 1): proxied and presigned, $CONC_HIGH and $CONC_LOW x $PART_MB MiB"
  for c in "$CONC_HIGH" "$CONC_LOW"; do
    parts_run pinned-parts-c$c "$c" parts --label "gateway (S3 on its own core)"
    parts_run pinned-presigned-c$c "$c" parts-presigned --label "s3 direct (S3 on its own core)"
  done
  ALL_CPUS="0-$(($(getconf _NPROCESSORS_ONLN) - 1))"
  for pid in "$S3_PID" "${OTHERS[@]}"; do taskset -acp "$ALL_CPUS" "$pid" >/dev/null; done
fi

fi

# --- 3. the whole flow -------------------------------------------------------------------
if want flow; then
log "flow: concurrency $FLOW_CONC, $FLOW_FILES files of $FLOW_FILE_SIZE bytes per session"
"$BENCH" flow --target "$GW" --key "$KEY" --concurrency "$FLOW_CONC" --files "$FLOW_FILES" --file-size "$FLOW_FILE_SIZE" \
  "${COMMON[@]}" --label gateway --json-out "$OUT/flow.json" >/dev/null

fi

# --- 4. Redis round trips (MONITOR, difference of two runs at concurrency 1) --------------
# Counts every command a client sent (top level) and every command run inside a script
# ("[0 lua]"), per command name.
monitor() { # file, command...
  local file=$1
  shift
  "${RCLI[@]}" monitor >"$file" &
  local mpid=$!
  sleep 0.5
  "$@" >/dev/null
  sleep 0.5
  kill "$mpid" 2>/dev/null || true
  wait "$mpid" 2>/dev/null || true
}
counts() { # monitor file -> "top|lua command count" lines
  awk '$1 ~ /^[0-9]+\.[0-9]+$/ {
         c = tolower($4); gsub(/"/, "", c)
         if ($3 == "lua]") s[c]++; else t[c]++
       }
       END { for (k in t) print "top", k, t[k]; for (k in s) print "lua", k, s[k] }' "$1"
}
per_op() { # small-file large-file n kind(top|lua) -> "commands|round trips|cmd x.xx, ..."
  # Round trips: top-level commands, except that deadpool-redis (the Redis Cluster pool)
  # pipelines UNWATCH with its recycle PING (one round trip for the two), so UNWATCH is not
  # counted as one.
  awk -v n="$3" -v kind="$4" '
    FNR == NR { if ($1 == kind) a[$2] = $3; next }
    $1 == kind { b[$2] = $3 }
    END {
      total = 0; trips = 0; out = ""
      for (k in b) {
        d = (b[k] - a[k]) / n
        if (d > 0.005) {
          out = out sprintf("%s%s %.2f", out == "" ? "" : ", ", k, d)
          total += d
          if (k != "unwatch") trips += d
        }
      }
      printf "%.2f|%.2f|%s\n", total, trips, out
    }' <(counts "$1") <(counts "$2")
}
field() { echo "$1" | cut -d'|' -f"$2"; }
N_SMALL=50
N_LARGE=250
if want rtt; then
log "redis round trips: register x$N_SMALL and x$N_LARGE at concurrency 1, gateway and baseline"
RT=(--concurrency 1 --duration 120 --warmup 0)
monitor "$WORK/gw-small.mon" "$BENCH" register --target "$GW" --key "$KEY" "${RT[@]}" --requests $N_SMALL
monitor "$WORK/gw-large.mon" "$BENCH" register --target "$GW" --key "$KEY" "${RT[@]}" --requests $N_LARGE
monitor "$WORK/bl-small.mon" "$BENCH" register --target "$BL" --key "$KEY" "${RT[@]}" --requests $N_SMALL
monitor "$WORK/bl-large.mon" "$BENCH" register --target "$BL" --key "$KEY" "${RT[@]}" --requests $N_LARGE
N=$((N_LARGE - N_SMALL))
GW_TOP=$(per_op "$WORK/gw-small.mon" "$WORK/gw-large.mon" $N top)
GW_LUA=$(per_op "$WORK/gw-small.mon" "$WORK/gw-large.mon" $N lua)
BL_TOP=$(per_op "$WORK/bl-small.mon" "$WORK/bl-large.mon" $N top)
log "redis round trips per proxied part: 1 file of 4 parts vs 1 file of 8 parts"
monitor "$WORK/p-small.mon" "$BENCH" parts --target "$GW" --key "$KEY" "${RT[@]}" --part-size "$PART_SIZE" --parts-per-file 4 --requests 4
monitor "$WORK/p-large.mon" "$BENCH" parts --target "$GW" --key "$KEY" "${RT[@]}" --part-size "$PART_SIZE" --parts-per-file 8 --requests 8
P_TOP=$(per_op "$WORK/p-small.mon" "$WORK/p-large.mon" 4 top)
cat >"$OUT/rtt.json" <<EOF
{"gatewayPerRegistration": $(field "$GW_TOP" 2), "gatewayCommandsPerRegistration": $(field "$GW_TOP" 1),
 "baselinePerRegistration": $(field "$BL_TOP" 2), "baselineCommandsPerRegistration": $(field "$BL_TOP" 1),
 "gatewayBreakdown": "$(field "$GW_TOP" 3)", "gatewayScriptCommands": "$(field "$GW_LUA" 3)",
 "baselineBreakdown": "$(field "$BL_TOP" 3)",
 "partRoundTripsPerPut": $(field "$P_TOP" 2), "partBreakdown": "$(field "$P_TOP" 3)"}
EOF

fi

# --- 5. Redis memory per session and per file ---------------------------------------------
if want mem; then
log "redis memory: $MEM_SESSIONS sessions x $MEM_FILES files"
"$BENCH" redis-mem --target "$GW" --key "$KEY" --redis "$REDIS_URL" --concurrency 8 \
  --sessions "$MEM_SESSIONS" --files "$MEM_FILES" --json-out "$OUT/redis-mem.json" >/dev/null

fi

# --- 6. filesystem storage: part PUTs alone vs upload + complete ---------------------------
# A second gateway on the same Redis with filesystem storage (the embedded default) in
# $WORK/fsdata; FS_FILE_MB-MiB files in PART_MB-MiB parts, 1 and 4 at a time. The parts-only
# run deletes each file's upload after its last part, the other completes the file first
# (then deletes it): the ratio of their part MB/s is what completing costs.
if want fs; then
FS_FILE_MB=${FS_FILE_MB:-256}
FS_PORT=$(free_port)
FS_ADMIN_PORT=$(free_port)
sed -e "s|^listen = .*|listen = \"127.0.0.1:$FS_PORT\"|" \
  -e "s|^admin_listen = .*|admin_listen = \"127.0.0.1:$FS_ADMIN_PORT\"|" \
  -e "s|^storage = .*|storage = \"file://$WORK/fsdata\"|" \
  "$OUT/gateway.toml" >"$OUT/gateway-fs.toml"
RUST_LOG=warn "$UPGATE" --config "$OUT/gateway-fs.toml" >"$OUT/gateway-fs.log" 2>&1 &
PIDS+=($!)
FS_PID=$!
wait_port "$FS_PORT" "gateway (filesystem storage)" "$FS_PID" || { tail -20 "$OUT/gateway-fs.log" >&2; exit 1; }
for c in 1 4; do
  for variant in parts complete; do
    log "filesystem storage: $c x ${FS_FILE_MB} MiB uploads, $variant"
    complete=false
    [ "$variant" = complete ] && complete=true
    "$BENCH" parts --target "http://127.0.0.1:$FS_PORT" --key "$KEY" --concurrency "$c" \
      --part-size "$PART_SIZE" --parts-per-file $((FS_FILE_MB / PART_MB)) --complete "$complete" \
      "${COMMON[@]}" --label "filesystem, $variant" --json-out "$OUT/fs-$variant-c$c.json" >/dev/null
  done
done
fi

# --- 7. webhooks: delivery rate and latency, and what recording events costs -----------
# A third gateway on the same Redis whose tenant has one webhook, to upgate-bench's sink.
# Registration round trips are counted as in section 4, with the delivery worker's own
# commands (its outbox scripts name `:evs` and `:evx` keys) counted apart. Then REG_CONC
# clients register for DURATION s; when the delivered count has not moved for 3 s the sink
# reports deliveries/s (first to last arrival) and latency (arrival minus the event's
# timestamp) of that backlog (hooks-sink-1.json), then of the one-client-at-a-time
# round-trip runs (hooks-sink-2.json: latency without a backlog).
if want hooks; then
"$BENCH" webhook-sink --json-out "$OUT/hooks-sink" >"$WORK/sink.env" 2>"$OUT/sink.log" &
SINK_PID=$!
PIDS+=($SINK_PID)
for _ in $(seq 1 100); do grep -q '^SINK_ADDR=' "$WORK/sink.env" 2>/dev/null && break; sleep 0.1; done
SINK_ADDR=$(sed -n 's/^SINK_ADDR=//p' "$WORK/sink.env")
[ -n "$SINK_ADDR" ] || { log "webhook-sink did not start"; cat "$OUT/sink.log" >&2; exit 1; }
HK_PORT=$(free_port)
HK_ADMIN_PORT=$(free_port)
sed -e "s|^listen = .*|listen = \"127.0.0.1:$HK_PORT\"|" \
  -e "s|^admin_listen = .*|admin_listen = \"127.0.0.1:$HK_ADMIN_PORT\"|" \
  "$OUT/gateway.toml" >"$OUT/gateway-hooks.toml"
cat >>"$OUT/gateway-hooks.toml" <<EOF

[[tenants.webhooks]]
url = "http://$SINK_ADDR/hook"
secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
EOF
RUST_LOG=warn "$UPGATE" --config "$OUT/gateway-hooks.toml" >"$OUT/gateway-hooks.log" 2>&1 &
PIDS+=($!)
HK_PID=$!
wait_port "$HK_PORT" "gateway (webhooks)" "$HK_PID" || { tail -20 "$OUT/gateway-hooks.log" >&2; exit 1; }
HK="http://127.0.0.1:$HK_PORT"
delivered() {
  curl -fsS "http://127.0.0.1:$HK_ADMIN_PORT/metrics" 2>/dev/null |
    awk '/^upgate_webhook_deliveries_total\{outcome="delivered"\}/ { print $2; f = 1 } END { if (!f) print 0 }'
}
settle() { # waits until the delivered count has not moved for 3 s (at most 120 s)
  local last=-1 same=0 now
  for _ in $(seq 1 240); do
    now=$(delivered)
    if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; last=$now; fi
    [ "$same" -ge 6 ] && return 0
    sleep 0.5
  done
}
log "webhooks: register at concurrency $REG_CONC for ${DURATION}s, then every event delivered"
"$BENCH" register --target "$HK" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
  --label "gateway, webhooks" --json-out "$OUT/register-hooks.json" >/dev/null
settle
kill -USR1 "$SINK_PID" 2>/dev/null || true
log "webhooks: redis round trips per registration, register x$N_SMALL and x$N_LARGE at concurrency 1"
RT=(--concurrency 1 --duration 120 --warmup 0)
monitor "$WORK/hk-small.mon" "$BENCH" register --target "$HK" --key "$KEY" "${RT[@]}" --requests $N_SMALL
settle
monitor "$WORK/hk-large.mon" "$BENCH" register --target "$HK" --key "$KEY" "${RT[@]}" --requests $N_LARGE
settle
for f in small large; do
  grep -v -e ':evs"' -e ':evx"' "$WORK/hk-$f.mon" >"$WORK/hk-$f-request.mon" || true
done
N=$((N_LARGE - N_SMALL))
HK_REQ=$(per_op "$WORK/hk-small-request.mon" "$WORK/hk-large-request.mon" $N top)
HK_ALL=$(per_op "$WORK/hk-small.mon" "$WORK/hk-large.mon" $N top)
kill -USR1 "$SINK_PID" 2>/dev/null || true
sleep 0.5
kill -TERM "$SINK_PID" 2>/dev/null || true
wait "$SINK_PID" 2>/dev/null || true
cat >"$OUT/hooks-rtt.json" <<EOF
{"requestPerRegistration": $(field "$HK_REQ" 2), "requestBreakdown": "$(field "$HK_REQ" 3)",
 "allPerRegistration": $(field "$HK_ALL" 2), "allBreakdown": "$(field "$HK_ALL" 3)"}
EOF
fi

# --- tus: PATCH MB/s against part PUTs, creation req/s against registration, same run ----
# PART_SIZE chunks (one part per PATCH, into a named session) against PART_SIZE part PUTs,
# both completing each 4-part file; 1 MiB chunks (five PATCHes per part: four wait as the tail in Redis) with the
# gateway's S3 requests counted from /metrics; POST /v1/tus into a session against the REST
# registration, both at REG_CONC.
if want tus; then
s3_calls() { # the gateway's S3 calls so far
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" |
    awk '/^upgate_backend_call_duration_seconds_count\{backend="storage"/ { n += $2 } END { print n + 0 }'
}
log "tus: part PUTs (${PART_MB} MiB, completing), then tus PATCH (${PART_MB} MiB chunks), concurrency $CONC_LOW"
"$BENCH" parts --target "$GW" --key "$KEY" --concurrency "$CONC_LOW" --part-size "$PART_SIZE" --parts-per-file 4 \
  --complete true "${COMMON[@]}" --label "REST parts" --json-out "$OUT/tus-parts.json" >/dev/null
"$BENCH" tus-patch --target "$GW" --key "$KEY" --concurrency "$CONC_LOW" --chunk-size "$PART_SIZE" --chunks-per-upload 4 \
  "${COMMON[@]}" --label "tus PATCH" --json-out "$OUT/tus-patch.json" >/dev/null
log "tus: PATCH in 1 MiB chunks, S3 requests counted"
S3_BEFORE=$(s3_calls)
"$BENCH" tus-patch --target "$GW" --key "$KEY" --concurrency "$CONC_LOW" --chunk-size 1048576 \
  --chunks-per-upload $((4 * PART_MB)) "${COMMON[@]}" --label "tus PATCH 1 MiB" --json-out "$OUT/tus-patch-1mib.json" >/dev/null
S3_AFTER=$(s3_calls)
log "tus: REST registration, then tus creation, concurrency $REG_CONC"
"$BENCH" register --target "$GW" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
  --label "REST register" --json-out "$OUT/tus-register.json" >/dev/null
"$BENCH" tus-create --target "$GW" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
  --label "tus create" --json-out "$OUT/tus-create.json" >/dev/null
python3 - "$OUT" "$S3_BEFORE" "$S3_AFTER" >"$OUT/tus.md" <<'PYTUS'
import json, sys
out, before, after = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def ep(name, endpoint):
    for e in json.load(open(f"{out}/{name}.json"))["endpoints"]:
        if e["endpoint"] == endpoint:
            return e
    raise SystemExit(f"{name}: no {endpoint}")
parts = ep("tus-parts", "upload part (proxied)")
patch = ep("tus-patch", "tus patch")
small = ep("tus-patch-1mib", "tus patch")
reg = ep("tus-register", "register file")
create = ep("tus-create", "tus create")
mib = small["bytes"] / 1048576
print("### tus against the REST API (same run)\n")
print("| | REST | tus | tus / REST |\n|---|---|---|---|")
print(f"| bytes, MB/s (part PUT vs PATCH, same size) | {parts['mbPerSec']:.1f} | {patch['mbPerSec']:.1f} | {patch['mbPerSec'] / max(parts['mbPerSec'], 1e-9):.2f} |")
print(f"| creation, req/s (register vs POST /v1/tus) | {reg['reqPerSec']:.0f} | {create['reqPerSec']:.0f} | {create['reqPerSec'] / max(reg['reqPerSec'], 1e-9):.2f} |")
print(f"\nPATCH in 1 MiB chunks: {small['mbPerSec']:.1f} MB/s; {after - before:.0f} S3 requests for {mib:.0f} MiB: {(after - before) / max(mib, 1e-9):.2f} per MiB uploaded (creates, part uploads, completes and the deletes of the run included).")
PYTUS
fi

# --- uppy: Companion's S3 routes, creation and part signing req/s --------------------------
# What @uppy/aws-s3 asks of its Companion: POST .../s3/multipart (a file registered; the S3
# multipart upload is created with the first part's URL) and GET .../s3/multipart/{id}/{n}
# (a part URL signed), the upload
# token in the path, at REG_CONC. Uppy Companion 6 measured 179 creations/s and 186
# signings/s on this machine (issue 19): the ratios below are against those figures.
if want uppy; then
log "uppy: Companion-route creations, then part signing, concurrency $REG_CONC"
"$BENCH" uppy-create --target "$GW" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
  --label "uppy create" --json-out "$OUT/uppy-create.json" >/dev/null
"$BENCH" uppy-sign --target "$GW" --key "$KEY" --concurrency "$REG_CONC" "${COMMON[@]}" \
  --label "uppy sign" --json-out "$OUT/uppy-sign.json" >/dev/null
python3 - "$OUT" >"$OUT/uppy.md" <<'PYUPPY'
import json, sys
out = sys.argv[1]
def ep(name, endpoint):
    for e in json.load(open(f"{out}/{name}.json"))["endpoints"]:
        if e["endpoint"] == endpoint:
            return e
    raise SystemExit(f"{name}: no {endpoint}")
create = ep("uppy-create", "uppy create")
sign = ep("uppy-sign", "uppy sign")
print("### Uppy Companion routes\n")
print("| | upgate req/s | p50 ms | p99 ms | errors | Companion req/s (issue 19) | upgate / Companion |\n|---|---|---|---|---|---|---|")
for name, e, companion in (("multipart creation", create, 179), ("part signing", sign, 186)):
    errors = e["errorCount"]
    print(f"| {name} | {e['reqPerSec']:.0f} | {e['p50Ms']:.2f} | {e['p99Ms']:.2f} | {errors} | {companion} | {e['reqPerSec'] / companion:.1f} |")
PYUPPY
fi

# --- report --------------------------------------------------------------------------------
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_GIB=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
echo "## upgate whole-gateway load test"
echo
echo "Machine: $(getconf _NPROCESSORS_ONLN) cores ($CPU), ${MEM_GIB} GiB RAM; $(redis-server --version | awk '{print $1, $2, $3}');"
echo "load generator, gateway, Redis and the S3 server all share these cores (except in the rows marked"
echo "\"S3 on its own core\"). ${DURATION} s per scenario after"
echo "${WARMUP} s of warm-up; parts are ${PART_MB} MiB; results in \`$OUT\`."
echo
"$BENCH" report --dir "$OUT"
if [ -f "$OUT/tus.md" ]; then echo; cat "$OUT/tus.md"; fi
if [ -f "$OUT/uppy.md" ]; then echo; cat "$OUT/uppy.md"; fi
if grep -q '"level":"ERROR"' "$OUT/gateway.log" 2>/dev/null; then
  echo
  echo "Gateway logged $(grep -c '"level":"ERROR"' "$OUT/gateway.log") error line(s); see $OUT/gateway.log."
fi
