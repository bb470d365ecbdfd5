#!/usr/bin/env python3
"""Measures the Redis memory upgate's session keys take, for deploy/OPERATIONS.md.

Starts a throwaway redis-server (no persistence) on a loopback port, writes keys shaped
exactly like src/store/redis.rs writes them (same key names, field names, value sizes,
PEXPIREAT on every session key, the reaper index entry), and reports:

  * MEMORY USAGE of each key of one representative session, and
  * INFO used_memory deltas over many sessions (what a capacity plan needs: it includes
    the key's dict entry and its TTL entry, which MEMORY USAGE leaves out),

once with Redis's compiled-in defaults (hash-max-listpack-value 64, which the file hash's
object_key / upload_id exceed, so file hashes fall back to the larger hashtable encoding)
and once with hash-max-listpack-value 512 (what deploy/kubernetes/cluster.yaml sets).

Standard library only. Usage:
    python3 deploy/measure-redis-memory.py [--port 6399] [--sessions 2000]
Needs redis-server on PATH. Nothing here runs in CI.
"""

import argparse
import random
import shutil
import socket
import string
import subprocess
import sys
import time
import uuid

PREFIX = "upgate"
TENANT = "acme"


class Redis:
    """A minimal pipelining RESP client."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, bytes):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(1 << 16)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data.decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)

    def pipeline(self, commands, batch=2000):
        replies = []
        for i in range(0, len(commands), batch):
            chunk = commands[i : i + batch]
            self.sock.sendall(b"".join(self.encode(c) for c in chunk))
            replies.extend(self._read() for _ in chunk)
        return replies

    def call(self, *args):
        return self.pipeline([args])[0]

    def used_memory(self):
        info = self.call("INFO", "memory")
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError("no used_memory in INFO")


def rand_text(n, alphabet=string.ascii_letters + string.digits):
    return "".join(random.choice(alphabet) for _ in range(n))


def session_commands(files, parts, now_s, with_upload_id=True, completed=False):
    """The keys one session with `files` files of `parts` recorded parts each leaves."""
    sid = str(uuid.uuid4())
    base = "%s:{%s:%s}:" % (PREFIX, TENANT, sid)
    expires_at = now_s + 1800
    keep_until_ms = (expires_at + 86400) * 1000
    metadata = '{"orderId":"ord_8c1f2e","uploader":"user-48213","x":1}'  # ~50 bytes
    cmds = [
        [
            "HSET", base + "s",
            "keep_until", keep_until_ms,
            "id", sid,
            "tenant", TENANT,
            "status", "active",
            "part_size_bytes", 5242880,
            "file_limit", 1000,
            "file_count", files,
            "created_at", now_s,
            "expires_at", expires_at,
            "metadata", metadata,
            "max_files", 50,
            "file_seq", files,
        ],
        ["PEXPIREAT", base + "s", keep_until_ms],
        # The reaper index: one global sorted set, member "tenant:session", score = due ms.
        ["ZADD", PREFIX + ":reap", expires_at * 1000, "%s:%s" % (TENANT, sid)],
    ]
    for i in range(files):
        fid = str(uuid.uuid4())
        file_key = "photos/2026/holiday/IMG_%04d.jpg" % i  # 32 bytes
        object_key = "incoming/%s/%s/%s/%s" % (TENANT, sid, fid, file_key)  # ~120 bytes
        fields = [
            "id", fid,
            "session_id", sid,
            "file_key", file_key,
            "file_name", "IMG_%04d.jpg" % i,
            "size_bytes", parts * 5242880,
            "status", "registered",
            "part_size_bytes", 5242880,
            "part_count", max(parts, 1),
            "created_at", now_s,
            "object_key", object_key,
            "content_type", "image/jpeg",
        ]
        if with_upload_id:
            # S3 multipart upload ids are opaque strings of roughly 100-200 characters.
            fields += ["upload_id", rand_text(150, string.ascii_letters + string.digits + "._-")]
        if completed:
            fields[fields.index("status") + 1] = "completed"
            fields += ["file_url", "s3://uploads-bucket/" + object_key, "etag", rand_text(32, "0123456789abcdef") + "-20"]
        cmds += [
            ["HSET", base + "keys", file_key, fid],
            ["ZADD", base + "o", i + 1, fid],
            ["HSET", base + "f:" + fid] + fields,
            ["PEXPIREAT", base + "f:" + fid, keep_until_ms],
        ]
        if parts:
            pfields = []
            for n in range(1, parts + 1):
                pfields += [n, "5242880:%s" % rand_text(32, "0123456789abcdef")]
            cmds += [["HSET", base + "p:" + fid] + pfields, ["PEXPIREAT", base + "p:" + fid, keep_until_ms]]
    if files:
        cmds += [["PEXPIREAT", base + "keys", keep_until_ms], ["PEXPIREAT", base + "o", keep_until_ms]]
    return base, cmds


def idempotency_commands(now_s):
    """One completed Idempotency-Key record (a 201 file body, ~450 bytes, plus headers)."""
    key = "%s:idem:{%s}:%s" % (PREFIX, TENANT, uuid.uuid4())
    body = (
        '{"fileId":"%s","fileKey":"photos/2026/holiday/IMG_0001.jpg","fileName":"IMG_0001.jpg",'
        '"sizeBytes":104857600,"contentType":"image/jpeg","status":"registered",'
        '"partSizeBytes":5242880,"partCount":20,"createdAt":"2026-11-27T16:38:00Z",'
        '"fileUrl":null,"etag":null}' % uuid.uuid4()
    )
    resp = "\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json" + body
    return [
        ["HSET", key, "fp", rand_text(32), "st", "c", "resp", resp],
        ["PEXPIRE", key, 86400 * 1000],
    ]


def delta(r, n, build):
    """Average used_memory growth per unit over n units built by build()."""
    r.call("FLUSHALL")
    time.sleep(0.05)
    before = r.used_memory()
    cmds = []
    for _ in range(n):
        cmds += build()
    r.pipeline(cmds)
    after = r.used_memory()
    return (after - before) / n


def measure(r, sessions, label):
    now_s = int(time.time())
    print("\n## %s" % label)
    print("config: " + ", ".join(
        "%s=%s" % (k, r.call("CONFIG", "GET", k)[1])
        for k in ("hash-max-listpack-entries", "hash-max-listpack-value")))

    # Per-key MEMORY USAGE of one representative session (10 files x 20 parts).
    r.call("FLUSHALL")
    base, cmds = session_commands(10, 20, now_s)
    r.pipeline(cmds)
    keys = sorted(r.call("KEYS", base.replace("{", "\\{").replace("}", "\\}") + "*"))
    print("\nMEMORY USAGE of one session with 10 files x 20 parts:")
    print("| key | encoding | bytes |")
    print("|---|---|---|")
    shown = set()
    for k in keys:
        kind = k[len(base):].split(":")[0]
        if kind in shown:
            continue
        shown.add(kind)
        print("| `%s` | %s | %d |" % (
            k.replace(base, "P:{t:s}:")[:60], r.call("OBJECT", "ENCODING", k),
            r.call("MEMORY", "USAGE", k, "SAMPLES", "0")))

    # used_memory deltas: session alone, + files, + parts.
    s0 = delta(r, sessions, lambda: session_commands(0, 0, now_s)[1])
    s10 = delta(r, sessions, lambda: session_commands(10, 0, now_s)[1])
    s10x20 = delta(r, sessions, lambda: session_commands(10, 20, now_s)[1])
    big = delta(r, max(sessions // 20, 20), lambda: session_commands(1, 200, now_s)[1])
    s1 = delta(r, sessions, lambda: session_commands(1, 0, now_s)[1])
    huge = delta(r, 20, lambda: session_commands(1, 2000, now_s)[1])
    done = delta(r, sessions, lambda: session_commands(10, 20, now_s, completed=True)[1])
    idem = delta(r, sessions * 5, lambda: idempotency_commands(now_s))
    per_file = (s10 - s0) / 10
    per_part = (s10x20 - s10) / 200
    per_part_big = (big - s1) / 200
    per_part_huge = (huge - s1) / 2000
    print("\nused_memory deltas (averaged over %d sessions):" % sessions)
    print("| what | bytes |")
    print("|---|---|")
    print("| session without files (session hash + reaper index entry) | %.0f |" % s0)
    print("| session with 10 files, no parts yet | %.0f |" % s10)
    print("| session with 10 files x 20 parts | %.0f |" % s10x20)
    print("| per file (keys + order entries, file hash with upload_id) | %.0f |" % per_file)
    print("| per recorded part (files of 20 parts) | %.1f |" % per_part)
    print("| per recorded part (files of 200 parts) | %.1f |" % per_part_big)
    print("| per recorded part (files of 2,000 parts: over hash-max-listpack-entries) | %.1f |" % per_part_huge)
    print("| session with 10 files x 20 parts, every file completed (file_url, etag) | %.0f |" % done)
    print("| per completed Idempotency-Key record (~450-byte body) | %.0f |" % idem)
    return {"s0": s0, "per_file": per_file, "per_part": per_part, "per_part_big": per_part_big, "idem": idem, "s10x20": s10x20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6399)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--tuned-value", type=int, default=512, help="hash-max-listpack-value of the second run")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not on PATH")
    random.seed(1)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(args.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                r = Redis(args.port)
                r.call("PING")
                break
            except (OSError, RuntimeError):
                time.sleep(0.05)
        else:
            sys.exit("redis-server did not start on port %d" % args.port)
        print("# upgate Redis memory, %s" % r.call("INFO", "server").split("redis_version:")[1].split()[0])
        default = measure(r, args.sessions, "Redis defaults")
        r.call("CONFIG", "SET", "hash-max-listpack-value", str(args.tuned_value))
        tuned = measure(r, args.sessions, "hash-max-listpack-value %d" % args.tuned_value)
        for name, m in (("defaults", default), ("tuned", tuned)):
            total = 10_000 * (m["s0"] + 10 * m["per_file"] + 200 * m["per_part"])
            print("\nworked example (%s): 10,000 sessions x 10 files x 20 parts = %.0f MiB" % (name, total / 2**20))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
