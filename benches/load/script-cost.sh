#!/usr/bin/env bash
# Redis's own cost of the registration script (benches/README.md, "Release profile and Redis's
# share").
#
# Starts a redis-server on a free 127.0.0.1 port and, for each script below, loads it, writes a
# session hash the way create.lua leaves one, drives `EVALSHA` with redis-benchmark (a fresh
# fileKey and file id on every call: `__rand_int__`) and prints Redis's own `usec_per_call` for
# the `EVALSHA` and for every command the script made. Nothing of the gateway runs: this is the
# Redis CPU a registration costs, which shares the cores with the gateway under load.
#   register       the gateway's script as it runs (the prelude, then register.lua)
#   no-zadd        the same without the order set's ZADD
#   no-retention   the same without the file hash's PEXPIREAT
#   no-zadd-no-retention
#   one-container  the data-model change benches/README.md names: the file's record as one
#                  packed field of a session-wide hash (retention set once, with the fileKey
#                  hash's), so no per-file PEXPIREAT and 1 argument instead of 22
#   baseline       the baseline server's one registration-shaped script (benches/load/src/baseline.rs)
#   empty          a script that only answers, with the register script's 6 keys and 29 arguments
# The variants are measurements only: the gateway never runs them (its guarantees need both).
#
# Knobs: N (calls per script, default 300000), CLIENTS (redis-benchmark connections, 16),
# ROUNDS (default 3: the scripts alternate, round after round).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LUA=$ROOT/src/store/lua
N=${N:-300000}
CLIENTS=${CLIENTS:-16}
ROUNDS=${ROUNDS:-3}
for tool in redis-server redis-cli redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "script-cost.sh: $tool is needed" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/upgate-script-cost.XXXXXX)
# A port below the kernel's ephemeral range (no outgoing connection can hold it), tried again
# on another one if something listens there.
LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "${LOW:-0}" -gt 12000 ] 2>/dev/null || LOW=32768
PORT=
trap 'if [ -n "$PORT" ]; then redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; fi; rm -rf "$WORK"' EXIT
for _ in 1 2 3 4 5; do
  try=$((10000 + RANDOM % (LOW - 10000)))
  redis-server --port "$try" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log" || continue
  for _ in $(seq 50); do
    if redis-cli -p "$try" ping >/dev/null 2>&1; then PORT=$try; break; fi
    sleep 0.1
  done
  [ -n "$PORT" ] && break
done
if [ -z "$PORT" ]; then
  echo "script-cost.sh: redis-server did not start; its log:" >&2
  cat "$WORK/redis.log" >&2 2>/dev/null || true
  exit 1
fi

# The scripts, written by one Python step so the variants are the real script with one
# statement taken out (the step fails if the statement is not found).
python3 - "$LUA" "$ROOT/benches/load/src/baseline.rs" "$WORK" <<'EOF'
import re, sys
lua, baseline_rs, out = sys.argv[1:4]
prelude = open(f"{lua}/prelude.lua").read()
register = open(f"{lua}/register.lua").read()
head = "local call = redis.call\n" + prelude + "\n"
zadd = "call('ZADD', KEYS[3], seq, ARGV[3])"
retention = re.search(r"if count == 0 then\n.*?\nend\n", register, re.S)
assert zadd in register and retention, "register.lua changed: update script-cost.sh"
file_hset = "call('HSET', KEYS[4], unpack(ARGV, 8))"
assert file_hset in register, "register.lua changed: update script-cost.sh"
variants = {
    "register": register,
    "no-zadd": register.replace(zadd, ""),
    "no-retention": register.replace(retention.group(0), ""),
    "no-zadd-no-retention": register.replace(zadd, "").replace(retention.group(0), ""),
    # KEYS[4] is the session's record hash here; ARGV[8] the packed record.
    "one-container": register.replace(file_hset, "call('HSET', KEYS[4], ARGV[3], ARGV[8])")
    .replace(retention.group(0), "if count == 0 then\n  keep_until(st[5], KEYS[2], KEYS[3], KEYS[4])\nend\n"),
}
for name, body in variants.items():
    open(f"{out}/{name}.lua", "w").write(head + body)
src = open(baseline_rs).read()
m = re.search(r'pub const REGISTER_LUA: &str = r#"\n(.*?)"#;', src, re.S)
assert m, "baseline.rs changed: update script-cost.sh"
open(f"{out}/baseline.lua", "w").write(m.group(1))
open(f"{out}/empty.lua", "w").write("return {'ok', 'created', '1'}")
EOF

S='upgate:{bench:session}:'
B='bl:{bench:session}:'
OBJ=bench/62790e84-96a2-4c7b-a0a7-035d865dcc97/d672ff7c-b01c-41e9-a885-0d15760cee38/k1
run() { # name
  local name=$1 sha
  redis-cli -p "$PORT" flushall >/dev/null
  sha=$(redis-cli -p "$PORT" -x script load < "$WORK/$name.lua")
  if [ "$name" = baseline ]; then
    redis-cli -p "$PORT" hset "${B}s" status active expires_at 9999999999 created_at 1 \
      file_limit 100000000 file_count 0 >/dev/null
    redis-cli -p "$PORT" config resetstat >/dev/null
    redis-benchmark -p "$PORT" -n "$N" -c "$CLIENTS" -r 100000000 -q EVALSHA "$sha" 3 \
      "${B}s" "${B}keys" "${B}f:__rand_int__" 1796418387829 "k__rand_int__" __rand_int__ \
      file_name wrk-1-12345.bin size_bytes 1048576 content_type application/octet-stream \
      status registered part_size_bytes 8388608 part_count 1 created_at 1796418387 \
      object_key "$OBJ" >/dev/null
  else
    # The session hash as create.lua writes it (the fields register.lua reads).
    redis-cli -p "$PORT" hset "${S}s" status active expires_at 9999999999 created_at 1 \
      file_limit 100000000 file_count 0 keep_until 99999999999999 part_size_bytes 8388608 \
      ordered 1 file_seq 0 >/dev/null
    redis-cli -p "$PORT" config resetstat >/dev/null
    # The arguments the gateway sends for a 1 MiB application/octet-stream file (captured
    # with MONITOR): now, fileKey, file id, size, part size, the two content-type probes,
    # then the file hash's 11 fields; for one-container, the record's key is the session's
    # record hash and the same 11 fields come packed into one JSON value.
    local file="${S}f:__rand_int__" fields=(id d672ff7c-b01c-41e9-a885-0d15760cee38
      session_id 62790e84-96a2-4c7b-a0a7-035d865dcc97 file_key k1 file_name wrk-1-12345.bin
      size_bytes 1048576 status registered part_size_bytes 8388608 part_count 1
      created_at 1796418387 object_key "$OBJ" content_type application/octet-stream)
    if [ "$name" = one-container ]; then
      file="${S}fr"
      fields=("$(python3 -c 'import json, sys; a = sys.argv[1:]
print(json.dumps(dict(zip(a[::2], a[1::2])), separators=(",", ":")))' "${fields[@]}")")
    fi
    redis-benchmark -p "$PORT" -n "$N" -c "$CLIENTS" -r 100000000 -q EVALSHA "$sha" 6 \
      "${S}s" "${S}keys" "${S}o" "$file" "${S}ev" "${S}evq" \
      1796418387829 "k__rand_int__" __rand_int__ 1048576 8388608 \
      $'\napplication/octet-stream\n' $'\napplication/*\n' "${fields[@]}" >/dev/null
  fi
  redis-cli -p "$PORT" info commandstats | python3 -c '
import sys
name = sys.argv[1]
stats = {}
for line in sys.stdin:
    if not line.startswith("cmdstat_"):
        continue
    cmd, rest = line[8:].strip().split(":", 1)
    f = dict(kv.split("=") for kv in rest.split(","))
    stats[cmd] = (int(f["calls"]), float(f["usec_per_call"]))
calls, ev = stats.pop("evalsha")
inner = " ".join(f"{c} {u:.2f}" for c, (n, u) in sorted(stats.items())
                 if c not in ("config|resetstat", "info") and n >= calls // 2)
print(f"| {name} | {ev:.2f} | {inner} |")
' "$name"
}

echo "| script | EVALSHA µs per call | its commands, µs per call (Redis's own figures) |"
echo "|---|---:|---|"
for _ in $(seq "$ROUNDS"); do
  for name in register no-zadd no-retention no-zadd-no-retention one-container baseline empty; do
    run "$name"
  done
done
