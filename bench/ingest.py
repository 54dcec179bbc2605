"""Ingest benchmark: the highest offered rate the collector stores with zero loss.

A sender process (pinned to one core) offers datagrams of 2 readings each
from ~100 sensors at a paced rate to a collector process (pinned to another
core).  A step passes when every datagram sent was stored and the kernel
dropped none; the rate doubles until a step fails, then bisects.  The same
search runs against a bare Python recv loop, so the headline is the ratio:
how much of a plain socket reader's speed the full pipeline (decode, track,
SQLite) keeps.  Also reported: rows/s into SQLite at the best rate and the
collector's peak RSS (VmHWM).  Every step is bounded in count and time.

    .venv/bin/python bench/ingest.py                 # the search, ~1-2 minutes
    .venv/bin/python bench/ingest.py --compare-insert  # executemany vs sqlite-utils insert_all
    .venv/bin/python bench/ingest.py --signed --skip-bare  # HMAC-signed datagrams, --require-auth
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def taskset(core: int | None) -> list[str]:
    if core is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(core)]


# --- the sender (runs as its own process) -------------------------------------------------


def datagram_prefixes(sensors: int) -> list[bytes]:
    """Wire v1 maps with `seq` last, written as a fixed-width uint32 (0xce): valid msgpack."""
    out = []
    for i in range(sensors):
        head = b"\x86" + b"".join(msgpack.packb(x) for x in (
            "v", 1, "id", f"bench-{i:04d}", "boot", 1, "ts", 1_700_000_000.0 + i, "r", {"temp": 21.5, "hum": 40.25},
        ))
        out.append(head + msgpack.packb("seq") + b"\xce")
    return out


# One key for every bench sensor, each under its own key id (the sensor id).
BENCH_KEY = bytes(range(32))


def key_file(path: Path, sensors: int) -> Path:
    path.write_text("".join(f"bench-{i:04d} = {BENCH_KEY.hex()}\n" for i in range(sensors)))
    path.chmod(0o600)
    return path


def send(target: str, rate: float, count: int, sensors: int, max_seconds: float, signed: bool = False) -> None:
    host, port = target.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, int(port)))
    prefixes = datagram_prefixes(sensors)
    pack = struct.Struct(">I").pack
    if signed:
        sys.path.insert(0, str(ROOT))
        from collector.auth import sign

        ids = [f"bench-{i:04d}" for i in range(sensors)]
    send_ = sock.send
    send_ = sock.send
    sent = failed = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    chunk = 64
    i = 0
    while i < count:
        # Pace per chunk: sleep when ahead of the schedule.
        due = start + i / rate
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        elif now > deadline:
            break
        for j in range(i, min(i + chunk, count)):
            k = j % sensors
            data = prefixes[k] + pack(j // sensors)
            if signed:
                data = sign(data, ids[k], BENCH_KEY)
            try:
                send_(data)
                sent += 1
            except OSError:
                failed += 1
        i += chunk
    elapsed = time.perf_counter() - start
    print(json.dumps({"sent": sent, "failed": failed, "elapsed": elapsed}))


def bare_recv(port_file: str, rcvbuf: int, idle: float) -> None:
    """The baseline: recv and count, nothing else."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE, like the collector
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    # Non-blocking reads until the socket is empty, then wait in select, as
    # the collector does (a socket timeout would cost a poll() per recv).
    import select

    sock.setblocking(False)
    recv = sock.recv
    n = 0
    wait = 30.0  # for the first datagram
    while True:
        try:
            while True:
                recv(65536)
                n += 1
        except BlockingIOError:
            pass
        if not select.select([sock], [], [], wait)[0]:
            break
        wait = idle
    print(json.dumps({"received": n}))


# --- one step --------------------------------------------------------------------------------


def run_sender(port: int, rate: float, seconds: float, sensors: int, core: int | None, signed: bool = False) -> dict:
    count = int(rate * seconds)
    cmd = [*taskset(core), sys.executable, __file__, "--_send", f"127.0.0.1:{port}", "--_rate", str(rate),
           "--_count", str(count), "--sensors", str(sensors), "--_max-seconds", str(seconds * 3 + 5)]
    if signed:
        cmd.append("--signed")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 30, check=True)
    return json.loads(out.stdout)


def step_collector(rate, args, workdir) -> dict:
    db = Path(workdir) / f"step-{int(rate)}.db"
    log = Path(workdir) / f"step-{int(rate)}.log"
    with open(log, "wb") as logf:
        cmd = [*taskset(args.collector_core), str(BIN / "telemetry-collector"), "--db", str(db),
               "--listen", "127.0.0.1:0", "--status-interval", "3600", "--flush-interval", str(args.flush_interval),
               "--batch-size", str(args.batch_size)]
        if args.signed:
            cmd += ["--keys", str(key_file(Path(workdir) / "keys", args.sensors)), "--require-auth"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf)
        try:
            port = None
            deadline = time.monotonic() + 10
            while port is None and time.monotonic() < deadline:
                m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", log.read_text())
                port = int(m.group(1)) if m else None
                time.sleep(0.02)
            if port is None:
                raise RuntimeError(f"collector did not start: {log.read_text()}")
            sent = run_sender(port, rate, args.seconds, args.sensors, args.sender_core, args.signed)
            # Wait until the collector has read everything (received stops growing).
            last, still = -1, 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(args.flush_interval + 0.1)
                counters = read_counters(db)
                if counters.get("received", 0) >= sent["sent"]:
                    break
                if counters.get("received", 0) == last:
                    still += 1
                    if still >= 3:
                        break
                last = counters.get("received", 0)
            hwm = vm_hwm(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    c = read_counters(db)
    return {
        "rate": rate,
        "sent": sent["sent"],
        "send_elapsed": sent["elapsed"],
        "received": int(c.get("received", 0)),
        "stored": int(c.get("stored", 0)),
        "stored_readings": int(c.get("stored_readings", 0)),
        "kernel_drops": int(c.get("kernel_drops", 0)),
        "peak_rss_kb": hwm,
        "ok": int(c.get("stored", 0)) == sent["sent"] and int(c.get("kernel_drops", 0)) == 0,
    }


def step_bare(rate, args, workdir) -> dict:
    port_file = Path(workdir) / "bare.port"
    port_file.unlink(missing_ok=True)
    cmd = [*taskset(args.collector_core), sys.executable, __file__, "--_bare", str(port_file),
           "--_rcvbuf", str(args.rcvbuf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("bare receiver did not start")
        time.sleep(0.01)
    sent = run_sender(int(port_file.read_text()), rate, args.seconds, args.sensors, args.sender_core, args.signed)
    out, _ = proc.communicate(timeout=60)
    received = json.loads(out)["received"]
    return {"rate": rate, "sent": sent["sent"], "send_elapsed": sent["elapsed"], "received": received,
            "ok": received == sent["sent"]}


def read_counters(db: Path) -> dict:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT name, value FROM counters"))
        finally:
            conn.close()
    except sqlite3.Error:
        return {}


def vm_hwm(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) if m else None


def search(step, args, workdir, label: str) -> tuple[dict | None, list[dict]]:
    """Double from --start until a step fails (or the sender's ceiling), then bisect."""
    results = []
    best = None
    rate = args.start
    fail = None
    while rate <= args.max_rate:
        r = step(rate, args, workdir)
        results.append(r)
        print(f"  {label} {rate:>9,.0f}/s offered: sent {r['sent']:,} in {r['send_elapsed']:.2f}s, "
              f"received {r['received']:,}" + (f", stored {r['stored']:,}, kernel_drops {r['kernel_drops']}"
                                                 if "stored" in r else "") + ("  ok" if r["ok"] else "  LOSS"),
              flush=True)
        achieved = r["sent"] / r["send_elapsed"]
        r["achieved"] = achieved
        if r["ok"]:
            best = r
            if achieved < rate * 0.9:
                best["sender_capped"] = True
                break  # the sender cannot offer more: this is the ceiling
            rate *= 2
        else:
            fail = rate
            break
    if fail is not None and best is not None:
        lo, hi = best["rate"], fail
        for _ in range(args.bisect_steps):
            mid = (lo + hi) / 2
            r = step(mid, args, workdir)
            r["achieved"] = r["sent"] / r["send_elapsed"]
            results.append(r)
            print(f"  {label} {mid:>9,.0f}/s offered: sent {r['sent']:,} in {r['send_elapsed']:.2f}s, "
                  f"received {r['received']:,}" + (f", kernel_drops {r['kernel_drops']}" if "stored" in r else "")
                  + ("  ok" if r["ok"] else "  LOSS"), flush=True)
            if r["ok"]:
                best, lo = r, mid
            else:
                hi = mid
    return best, results


# --- insert comparison -----------------------------------------------------------------------


def compare_insert(rows_existing: int, rows_new: int) -> None:
    import sqlite_utils

    sys.path.insert(0, str(ROOT))
    from collector import schema, tuning
    from collector.store import INSERT_READINGS, _insert_readings

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for how in ("executemany", "insert_all", "multirow"):
            path = os.path.join(tmp, f"{how}.db")
            db = schema.open_writer(path)
            conn = db.conn
            conn.execute(f"PRAGMA cache_size=-{tuning.WRITER_CACHE_KIB}")  # as the collector does
            base = 1_700_000_000.0

            def rows(start, n):
                return [(1 + i % 100, base + (start + i) // 100, 1, (start + i) // 100, float(i), base) for i in range(n)]

            conn.execute("BEGIN")
            conn.executemany(INSERT_READINGS, rows(0, rows_existing))
            conn.execute("COMMIT")
            new = rows(rows_existing, rows_new)
            t = time.perf_counter()
            for k in range(0, rows_new, 20_000):
                chunk = new[k:k + 20_000]
                conn.execute("BEGIN")
                if how == "executemany":
                    conn.executemany(INSERT_READINGS, chunk)
                elif how == "multirow":
                    _insert_readings(conn, chunk)
                else:
                    cols = ("series", "ts", "boot", "seq", "value", "received")
                    sqlite_utils.Database(conn)["readings"].insert_all(
                        (dict(zip(cols, r)) for r in chunk), ignore=True, batch_size=20_000)
                conn.execute("COMMIT")
            results[how] = (time.perf_counter() - t) / rows_new * 1e6
            conn.close()
        for how, us in results.items():
            print(f"{how:12s} {us:.2f} us/row ({rows_new:,} rows into a table of {rows_existing:,})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="traffic per step")
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--start", type=float, default=25_000)
    p.add_argument("--max-rate", type=float, default=400_000)
    p.add_argument("--bisect-steps", type=int, default=3)
    p.add_argument("--collector-core", type=int, default=0)
    p.add_argument("--sender-core", type=int, default=1)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=20_000)
    p.add_argument("--rcvbuf", type=int, default=8 * 1024 * 1024)
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-collector", action="store_true")
    p.add_argument("--compare-insert", action="store_true")
    p.add_argument("--signed", action="store_true", help="HMAC-signed datagrams; the collector runs --require-auth")
    p.add_argument("--_send")
    p.add_argument("--_rate", type=float)
    p.add_argument("--_count", type=int)
    p.add_argument("--_max-seconds", type=float, default=60)
    p.add_argument("--_bare")
    p.add_argument("--_rcvbuf", type=int, default=8 * 1024 * 1024)
    args = p.parse_args()
    if args._send:
        send(args._send, args._rate, args._count, args.sensors, args._max_seconds, args.signed)
        return
    if args._bare:
        bare_recv(args._bare, args._rcvbuf, idle=1.0)
        return
    if args.compare_insert:
        compare_insert(2_000_000, 200_000)
        return
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    with tempfile.TemporaryDirectory() as workdir:
        print(f"collector on core {args.collector_core}, sender on core {args.sender_core}, "
              f"{args.sensors} sensors, 2 readings/datagram{', signed' if args.signed else ''}, {args.seconds:g} s per step")
        best = None
        if not args.skip_collector:
            best, _ = search(step_collector, args, workdir, "collector")
        bare = None
        if not args.skip_bare:
            bare, _ = search(step_bare, args, workdir, "bare recv")
    print()
    if args.skip_collector:
        pass
    elif best:
        rows_s = best["stored_readings"] / best["send_elapsed"]
        print(f"collector: {best['achieved']:,.0f} datagrams/s (offered {best['rate']:,.0f}/s) stored with zero loss, "
              f"{rows_s:,.0f} rows/s into SQLite, peak RSS {best['peak_rss_kb'] / 1024:.1f} MB")
    else:
        print("collector: lost datagrams even at the starting rate")
    if bare:
        capped = " (the sender's ceiling: the loop is faster still)" if bare.get("sender_capped") else ""
        print(f"bare Python recv loop: {bare['achieved']:,.0f} datagrams/s with zero loss{capped}")
        if best:
            bound = "<= " if bare.get("sender_capped") else ""
            print(f"ratio collector / bare recv: {bound}{best['achieved'] / bare['achieved']:.2f}")


if __name__ == "__main__":
    main()
