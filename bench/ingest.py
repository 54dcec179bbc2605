"""Ingest benchmark: the highest offered rate the collector stores with zero loss,
side by side with InfluxDB 1.6's `[[udp]]` listener in the same run.

A sender process (pinned to one core) offers datagrams of 2 (then 5)
readings each from 100 sensors at a paced rate to a receiver pinned to the
other core: the collector (msgpack wire v1), InfluxDB 1.6 (the Debian
package `influxdb`, started here with a temporary config on loopback: the
same readings as line protocol, one point per datagram), and a bare Python
recv loop (the sender's ceiling).  A step passes when every datagram sent
was stored (the collector's counters, with no kernel drops; InfluxDB's
count(*) queried back over HTTP; the bare loop's count); the rate doubles
until a step fails, then bisects until the lowest loss is within 2.5 % of
the best pass (`--resolution`; at most `--bisect-steps` 6: with a pass at
100k and a loss at 200k, 5 steps, 3,125/s apart; 12,500/s apart after the
3 steps of session 5 could not tell 1.08x from 1.17x, either side of the
1.1x target), and the receivers take their steps in turn
(so that load from elsewhere on a shared machine falls on each alike, not on
whichever searched last).  Every receiver gets the same socket
receive buffer.  Printed: zero-loss datagrams/s for each, the ratio
collector / InfluxDB, the lowest rate that lost above it (the search's
resolution), and each receiver's peak RSS (VmHWM).  Every step is
bounded in count and time.

The sender sends each round of the sensors' datagrams with one sendmmsg(2)
call (`--sender send`: one send() per datagram, the earlier sender, whose
~250k/s ceiling was InfluxDB's figure with 2 readings).  Steps last 6 s
(`--seconds`): what costs the receivers periodically (the collector's chunk
closes come round every ~1,000 datagrams per sensor, SQLite checkpoints
every ~1,000 WAL pages, InfluxDB's cache snapshots and compactions) shows
in 6 s at these rates but can miss a 2 s step: the quiet-machine figures of
session 4 passed 150k/s for 2 s and lost at 8 s.  A full run of
`--readings 2 5 --skip-bare` then takes ~8-9 minutes.

    .venv/bin/python bench/ingest.py                      # 2 and 5 readings, all receivers, ~12 min
    .venv/bin/python bench/ingest.py --readings 2 5 --skip-bare   # collector and InfluxDB, ~8-9 min
    .venv/bin/python bench/ingest.py --readings 2 --skip-influx
    .venv/bin/python bench/ingest.py --series 2000x5 --fixed-rate 20000   # RSS with 10,000 series
    .venv/bin/python bench/ingest.py --compare-insert     # executemany vs sqlite-utils insert_all
    .venv/bin/python bench/ingest.py --signed --skip-bare --skip-influx   # HMAC-signed, --require-auth
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

# The readings every datagram carries (the first N of them), as a device
# quantizes them; the same values go to InfluxDB as line protocol fields.
READINGS = {"temp": 21.53, "hum": 40.2, "pres": 1013.25, "bat": 3.712, "count": 123456}
TS0 = 1_700_000_000


def readings(n: int) -> dict:
    if not 1 <= n <= len(READINGS):
        raise SystemExit(f"--readings must be 1-{len(READINGS)}")
    return dict(list(READINGS.items())[:n])


def datagram_prefixes(sensors: int, n_readings: int = 2) -> list[bytes]:
    """Wire v1 maps with `seq` last, written as a fixed-width uint32 (0xce): valid msgpack."""
    out = []
    for i in range(sensors):
        head = b"\x86" + b"".join(
            msgpack.packb(x)
            for x in (
                "v",
                1,
                "id",
                f"bench-{i:04d}",
                "boot",
                1,
                "ts",
                TS0 + i + 0.0,
                "r",
                readings(n_readings),
            )
        )
        out.append(head + msgpack.packb("seq") + b"\xce")
    return out


def line_prefixes(sensors: int, n_readings: int = 2) -> list[bytes]:
    """Line protocol up to the timestamp: one point per datagram, one series per sensor."""
    fields = ",".join(f"{k}={v}i" if type(v) is int else f"{k}={v}" for k, v in readings(n_readings).items())
    return [f"bench,sensor=bench-{i:04d} {fields} ".encode() for i in range(sensors)]


# How the sender process sends (--sender): "mmsg" (sendmmsg, 64 per call) or "send".
SENDER = "mmsg"

# One key for every bench sensor, each under its own key id (the sensor id).
BENCH_KEY = bytes(range(32))


def key_file(path: Path, sensors: int) -> Path:
    path.write_text("".join(f"bench-{i:04d} = {BENCH_KEY.hex()}\n" for i in range(sensors)))
    path.chmod(0o600)
    return path


class RoundSender:
    """sendmmsg(2) through ctypes (the mirror of collector/mmsg.py's recvmmsg):
    one system call per round of datagrams, one per sensor, which differ from
    round to round only in their last `suffix_len` bytes (the seq, or the line
    protocol's timestamp), the same for every datagram of a round.  Each
    sensor's slot of one reused buffer keeps its prefix; a round writes the
    suffix into every slot at once (numpy) and sends the first `n` slots."""

    def __init__(self, sock: socket.socket, prefixes: list[bytes], suffix_len: int) -> None:
        import ctypes

        import numpy as np

        sys.path.insert(0, str(ROOT))
        from collector.mmsg import _Iovec as Iovec  # the structures recvmmsg takes, sendmmsg too
        from collector.mmsg import _Mmsghdr as Mmsghdr

        func = ctypes.CDLL(None, use_errno=True).sendmmsg
        func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        func.restype = ctypes.c_int
        self._sendmmsg = func
        self.fd = sock.fileno()
        vlen = len(prefixes)
        size = max(map(len, prefixes)) + suffix_len
        self._data = ctypes.create_string_buffer(vlen * size)
        base = ctypes.addressof(self._data)

        self._iovecs = (Iovec * vlen)(
            *(Iovec(base + i * size, len(prefix) + suffix_len) for i, prefix in enumerate(prefixes))
        )
        self._msgs = (Mmsghdr * vlen)()
        for i, m in enumerate(self._msgs):
            m.msg_hdr.msg_iov = ctypes.addressof(self._iovecs[i])
            m.msg_hdr.msg_iovlen = 1
        self._msgs_at = ctypes.addressof(self._msgs)
        self._mmsg_size = ctypes.sizeof(Mmsghdr)
        self._buf = np.frombuffer(self._data, dtype=np.uint8)
        for i, prefix in enumerate(prefixes):
            self._buf[i * size : i * size + len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        at = np.array([i * size + len(prefix) for i, prefix in enumerate(prefixes)])
        self._suffix_at = at[:, None] + np.arange(suffix_len)  # every slot's suffix bytes
        self._np = np

    def send_round(self, suffix: bytes, n: int) -> tuple[int, int]:
        """Send the first `n` slots with `suffix`; (sent, failed)."""
        self._buf[self._suffix_at] = self._np.frombuffer(suffix, dtype=self._np.uint8)
        sent = failed = 0
        start = 0
        while start < n:
            k = self._sendmmsg(self.fd, self._msgs_at + start * self._mmsg_size, n - start, 0)
            if k < 0:  # the first datagram of the call failed (as send() raising OSError)
                failed += 1
                start += 1
            else:
                sent += k
                start += k
        return sent, failed


def send(
    target: str,
    rate: float,
    count: int,
    sensors: int,
    max_seconds: float,
    signed: bool = False,
    n_readings: int = 2,
    line: bool = False,
    mode: str = "mmsg",
) -> None:
    """Offer `count` datagrams at `rate` until done or `max_seconds`: datagram j
    is sensor j % sensors' with seq j // sensors.  `mode` "mmsg": one
    sendmmsg(2) call per round of the sensors (RoundSender; signed datagrams
    and more than 1,024 sensors take the "send" path); "send": one send() per
    datagram (sessions 1-4's sender, whose ceiling, ~250k/s here, hid
    InfluxDB's), paced per 64.  Either sleeps when ahead of the schedule."""
    host, port = target.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, int(port)))
    if line:
        prefixes = line_prefixes(sensors, n_readings)

        # A distinct nanosecond timestamp per point of a series (seq seconds
        # after TS0), or InfluxDB would overwrite and count fewer.
        def pack(seq: int, _base=TS0 * 10**9) -> bytes:
            return b"%d" % (_base + seq * 10**9)
    else:
        prefixes = datagram_prefixes(sensors, n_readings)
        pack = struct.Struct(">I").pack
    sent = failed = 0
    # Set up before the schedule starts: RoundSender imports numpy (~60-90 ms), and a
    # schedule started before it began that far behind and sent as much at once, a burst at
    # the start of every step (session 11, docs/OPERATIONS.md).
    fast = mode == "mmsg" and not signed and sensors <= 1024  # UIO_MAXIOV
    rounds = RoundSender(sock, prefixes, len(pack(0))) if fast else None
    start = time.perf_counter()
    deadline = start + max_seconds
    if rounds is not None:
        seq = 0
        behind = 0.0  # how far behind its schedule the sender fell at most (it then sends at once)
        late: list[tuple[float, float]] = []  # (due, behind) of rounds sent over 5 ms late
        while seq * sensors < count:
            due = start + seq * sensors / rate
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            elif now > deadline:
                break
            else:
                if now - due > 0.005 and len(late) < 100:  # when it fell behind, for bench/ingest_stalls.py --events
                    late.append((round(due - start, 4), round(now - due, 4)))
                behind = max(behind, now - due)
            ok, bad = rounds.send_round(pack(seq), min(sensors, count - seq * sensors))
            sent += ok
            failed += bad
            seq += 1
        elapsed = time.perf_counter() - start
        print(
            json.dumps(
                {"sent": sent, "failed": failed, "elapsed": elapsed, "behind_max": behind, "late": late, "t0": start}
            )
        )
        return
    if signed:
        sys.path.insert(0, str(ROOT))
        from collector.auth import sign

        ids = [f"bench-{i:04d}" for i in range(sensors)]
    send_ = sock.send
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
    """The baseline: receive and count, nothing else; recvmmsg (64 per call, as
    the collector reads) where libc has it, else recv per datagram."""
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

    sys.path.insert(0, str(ROOT))
    from collector import mmsg

    sock.setblocking(False)
    receive = mmsg.BatchReceiver(sock, 64, 2048).receive if mmsg.available() else None
    recv = sock.recv
    n = 0
    wait = 30.0  # for the first datagram
    while True:
        if receive is not None:
            while True:
                datas, cut, _ = receive()
                if not datas and not cut:
                    break
                n += len(datas) + cut
        else:
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


def run_sender(
    port: int,
    rate: float,
    seconds: float,
    sensors: int,
    core: int | None,
    signed: bool = False,
    n_readings: int = 2,
    line: bool = False,
) -> dict:
    count = int(rate * seconds)
    cmd = [
        *taskset(core),
        sys.executable,
        __file__,
        "--_send",
        f"127.0.0.1:{port}",
        "--_rate",
        str(rate),
        "--_count",
        str(count),
        "--sensors",
        str(sensors),
        "--_max-seconds",
        str(seconds * 3 + 5),
        "--_readings",
        str(n_readings),
    ]
    if signed:
        cmd.append("--signed")
    if line:
        cmd.append("--_line")
    cmd += ["--sender", SENDER]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 30, check=True)
    return json.loads(out.stdout)


def start_collector(
    db: Path, log: Path, args, extra: tuple[str, ...] = (), program: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int]:
    """`telemetry-collector` (or `program`, which takes its options) on --collector-core with
    the step's settings, logging to `log`; (the process, its UDP port) once it listens.
    bench/uplink.py and bench/ingest_stalls.py start their collectors here too."""
    cmd = [
        *taskset(args.collector_core),
        *(program or (str(BIN / "telemetry-collector"),)),
        "--db",
        str(db),
        "--listen",
        "127.0.0.1:0",
        "--status-interval",
        "3600",
        "--flush-interval",
        str(args.flush_interval),
        "--batch-size",
        str(args.batch_size),
        "--rcvbuf",
        str(args.rcvbuf),
        *extra,
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"collector did not start: {log.read_text()}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 60) -> None:
    """`sig` (the collector, InfluxDB: SIGTERM flushes what they hold and exits), SIGKILL after `grace` s."""
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def step_collector(rate, args, workdir) -> dict:
    step_dir = Path(tempfile.mkdtemp(prefix=f"collector-{int(rate)}-", dir=workdir))  # fresh counters each step
    db = step_dir / "telemetry.db"
    log = step_dir / "collector.log"
    extra = ("--keys", str(key_file(Path(workdir) / "keys", args.sensors)), "--require-auth") if args.signed else ()
    proc, port = start_collector(db, log, args, extra)
    try:
        sent = run_sender(port, rate, args.seconds, args.sensors, args.sender_core, args.signed, args.n_readings)
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
        stop_process(proc)
    c = read_counters(db)
    return {
        "rate": rate,
        "sent": sent["sent"],
        "send_elapsed": sent["elapsed"],
        "sender_late_ms": round(sent.get("behind_max", 0.0) * 1e3, 1),  # then it sent that much at once
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
    cmd = [
        *taskset(args.collector_core),
        sys.executable,
        __file__,
        "--_bare",
        str(port_file),
        "--_rcvbuf",
        str(args.rcvbuf),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("bare receiver did not start")
        time.sleep(0.01)
    sent = run_sender(
        int(port_file.read_text()), rate, args.seconds, args.sensors, args.sender_core, args.signed, args.n_readings
    )
    out, _ = proc.communicate(timeout=60)
    received = json.loads(out)["received"]
    return {
        "rate": rate,
        "sent": sent["sent"],
        "send_elapsed": sent["elapsed"],
        "sender_late_ms": round(sent.get("behind_max", 0.0) * 1e3, 1),  # then it sent that much at once
        "received": received,
        "ok": received == sent["sent"],
    }


# --- InfluxDB 1.6 ----------------------------------------------------------------------------


def free_port(kind: int) -> int:
    """A port the kernel has free right now (InfluxDB needs ports in its config file)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def influx_config(workdir: Path, udp_port: int, http_port: int, rpc_port: int, rcvbuf: int) -> Path:
    """A minimal influxd config: loopback only, nothing but HTTP and one [[udp]] listener."""
    path = workdir / "influxdb.conf"
    path.write_text(f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
  logging-enabled = false
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
[logging]
  level = "warn"
[[udp]]
  enabled = true
  bind-address = "127.0.0.1:{udp_port}"
  database = "bench"
  batch-size = 5000
  batch-pending = 10
  batch-timeout = "1s"
  read-buffer = {rcvbuf}
""")
    return path


def influx_query(http_port: int, q: str, db: str | None = None, method: str = "GET") -> dict:
    import urllib.parse
    import urllib.request

    params = {"q": q, **({"db": db} if db else {})}
    url = f"http://127.0.0.1:{http_port}/query?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def influx_count(http_port: int) -> int:
    """Points stored in measurement `bench` (one per datagram), read back over HTTP."""
    out = influx_query(http_port, 'SELECT count("temp") FROM "bench"', db="bench")
    series = out["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def step_influx(rate, args, workdir) -> dict:
    """One step against a fresh influxd (its own data directory), pinned like the collector."""
    exe = shutil.which("influxd")
    if exe is None:
        raise SystemExit(
            "influxd is missing: apt-get install influxdb (the Debian package, InfluxDB 1.6), or pass --skip-influx"
        )
    home = Path(tempfile.mkdtemp(prefix=f"influx-{int(rate)}-", dir=workdir))
    udp_port, http_port, rpc_port = (
        free_port(socket.SOCK_DGRAM),
        free_port(socket.SOCK_STREAM),
        free_port(socket.SOCK_STREAM),
    )
    conf = influx_config(home, udp_port, http_port, rpc_port, args.rcvbuf)
    log = home / "influxd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [*taskset(args.collector_core), exe, "run", "-config", str(conf)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, INFLUXDB_CONFIG_PATH=str(conf)),
        )
    try:
        deadline = time.monotonic() + 30
        while True:  # HTTP up, then the database, before the first datagram
            try:
                influx_query(http_port, "CREATE DATABASE bench", method="POST")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"influxd did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        sent = run_sender(
            udp_port, rate, args.seconds, args.sensors, args.sender_core, False, args.n_readings, line=True
        )
        # InfluxDB's UDP batcher writes every batch-timeout (1 s): wait until
        # the count reaches what was sent or stops growing.
        stored, last, still = 0, -1, 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            stored = influx_count(http_port)
            if stored >= sent["sent"]:
                break
            still = still + 1 if stored == last else 0
            if still >= 6:
                break
            last = stored
        hwm = vm_hwm(proc.pid)
    finally:
        stop_process(proc, grace=30)
        shutil.rmtree(home, ignore_errors=True)
    return {
        "rate": rate,
        "sent": sent["sent"],
        "send_elapsed": sent["elapsed"],
        "sender_late_ms": round(sent.get("behind_max", 0.0) * 1e3, 1),  # then it sent that much at once
        "received": stored,
        "stored": stored,
        "kernel_drops": "n/a",
        "peak_rss_kb": hwm,
        "ok": stored == sent["sent"],
    }


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


def _searcher(args):
    """The search as a generator: yields the next rate to offer, is sent that
    step's result, returns (best, results).  Doubles from --start until a
    step fails (or the sender's ceiling), then bisects."""
    results: list[dict] = []
    best = None
    rate = args.start
    fail = None
    while rate <= args.max_rate:
        r = yield rate
        results.append(r)
        achieved = r["sent"] / r["send_elapsed"]
        r["achieved"] = achieved
        if r["ok"]:
            best = r
            if achieved < rate * 0.9:
                best["sender_capped"] = True
                break  # the sender cannot offer more: this is the ceiling
            if fail is not None:
                break  # found by halving: bisect between this and the failure
            rate *= 2
        else:
            fail = rate
            if best is not None or rate < args.start / 8:
                break
            rate /= 2  # even the start lost: halve (at most 3 times) to find a passing rate
    if fail is not None and best is not None:
        lo, hi = best["rate"], fail
        for _ in range(args.bisect_steps):
            if hi - lo <= args.resolution * lo:
                break  # fine enough: e.g. 2.5 % tells 1.1x from 1.08x and 1.13x
            mid = (lo + hi) / 2
            r = yield mid
            r["achieved"] = r["sent"] / r["send_elapsed"]
            results.append(r)
            if r["ok"]:
                best, lo = r, mid
            else:
                hi = mid
    # The zero-loss figure is the passing step that achieved the most: on a
    # loaded machine the sender can fall behind in a later, higher step.
    passed = [r for r in results if r["ok"]]
    best = max(passed, key=lambda r: r["achieved"]) if passed else None
    if best is not None:
        above = [r["rate"] for r in results if not r["ok"] and r["rate"] > best["rate"]]
        best["lost_at"] = min(above, default=None)  # the search's resolution, where it ended
    return best, results


def _print_step(label: str, rate: float, r: dict) -> None:
    print(
        f"  {label} {rate:>9,.0f}/s offered: sent {r['sent']:,} in {r['send_elapsed']:.2f}s, "
        f"received {r['received']:,}"
        + (f", stored {r['stored']:,}, kernel_drops {r['kernel_drops']}" if "stored" in r else "")
        + (f", the sender {r['sender_late_ms']:.0f} ms late at most" if r.get("sender_late_ms", 0) > 5 else "")
        + ("  ok" if r["ok"] else "  LOSS"),
        flush=True,
    )


def search(step, args, workdir, label: str) -> tuple[dict | None, list[dict]]:
    """Double from --start until a step fails (or the sender's ceiling), then bisect."""
    return search_together([(label, step)], args, workdir)[label]


def search_together(steps, args, workdir) -> dict[str, tuple[dict | None, list[dict]]]:
    """Each receiver's search, their steps taken in turn (A B, B A, A B, ...), so that
    load from elsewhere on the machine falls on all of them alike: the ratio is
    then fair on a shared machine where a whole search run after another was not."""
    gens = {label: _searcher(args) for label, _ in steps}
    rates: dict[str, float] = {}
    done: dict[str, tuple[dict | None, list[dict]]] = {}
    for label, gen in gens.items():
        rates[label] = next(gen)
    order = [label for label, _ in steps]
    fns = dict(steps)
    while len(done) < len(order):
        for label in order:
            if label in done:
                continue
            rate = rates[label]
            r = fns[label](rate, args, workdir)
            _print_step(label, rate, r)
            try:
                rates[label] = gens[label].send(r)
            except StopIteration as stop:
                done[label] = stop.value
        order.reverse()
    return done


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
                return [
                    (1 + i % 100, base + (start + i) // 100, 1, (start + i) // 100, float(i), base) for i in range(n)
                ]

            conn.execute("BEGIN")
            conn.executemany(INSERT_READINGS, rows(0, rows_existing))
            conn.execute("COMMIT")
            new = rows(rows_existing, rows_new)
            t = time.perf_counter()
            for k in range(0, rows_new, 20_000):
                chunk = new[k : k + 20_000]
                conn.execute("BEGIN")
                if how == "executemany":
                    conn.executemany(INSERT_READINGS, chunk)
                elif how == "multirow":
                    _insert_readings(conn, chunk)
                else:
                    cols = ("series", "ts", "boot", "seq", "value", "received")
                    sqlite_utils.Database(conn)["readings"].insert_all(
                        (dict(zip(cols, r)) for r in chunk), ignore=True, batch_size=20_000
                    )
                conn.execute("COMMIT")
            results[how] = (time.perf_counter() - t) / rows_new * 1e6
            conn.close()
        for how, us in results.items():
            print(f"{how:12s} {us:.2f} us/row ({rows_new:,} rows into a table of {rows_existing:,})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds", type=float, default=6.0, help="traffic per step (6 s: long enough for periodic stalls to show)"
    )
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--readings", type=int, nargs="+", default=[2, 5], help="readings per datagram, one search each")
    p.add_argument(
        "--series",
        metavar="SENSORSxREADINGS",
        help="the many-series mode, e.g. 2000x5 (10,000 series): sets --sensors and --readings",
    )
    p.add_argument("--fixed-rate", type=float, help="one step at this rate instead of the search (for RSS)")
    p.add_argument("--skip-influx", action="store_true")
    p.add_argument("--start", type=float, default=25_000)
    p.add_argument("--max-rate", type=float, default=400_000)
    p.add_argument("--bisect-steps", type=int, default=6, help="at most this many steps between a pass and a loss")
    p.add_argument(
        "--resolution",
        type=float,
        default=0.025,
        help="bisect until the lowest loss is within this fraction of the best pass (0.025: 2.5 %%)",
    )
    p.add_argument("--collector-core", type=int, default=0)
    p.add_argument("--sender-core", type=int, default=1)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=20_000)
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=None,
        help="receive buffer for every receiver (default: 8 MiB capped at net.core.rmem_max, "
        "which InfluxDB cannot pass)",
    )
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
    p.add_argument("--_readings", type=int, default=2)
    p.add_argument("--_line", action="store_true")
    p.add_argument(
        "--sender",
        choices=("mmsg", "send"),
        default="mmsg",
        help="how the sender process sends: sendmmsg(2), 64 datagrams per call (default), or one send() "
        "per datagram (the earlier sender, whose ceiling was below InfluxDB's)",
    )
    args = p.parse_args()
    if args._send:
        send(
            args._send,
            args._rate,
            args._count,
            args.sensors,
            args._max_seconds,
            args.signed,
            args._readings,
            args._line,
            args.sender,
        )
        return
    if args._bare:
        bare_recv(args._bare, args._rcvbuf, idle=1.0)
        return
    if args.compare_insert:
        compare_insert(2_000_000, 200_000)
        return
    global SENDER
    SENDER = args.sender
    if (os.cpu_count() or 1) < 2:
        args.collector_core = args.sender_core = None
    if args.series:
        try:
            sensors, n = (int(x) for x in args.series.lower().split("x"))
        except ValueError:
            raise SystemExit("--series wants SENSORSxREADINGS, e.g. 2000x5") from None
        args.sensors, args.readings = sensors, [n]
    if args.rcvbuf is None:
        try:
            rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
        except (OSError, ValueError):
            rmem_max = 8 * 1024 * 1024
        args.rcvbuf = min(8 * 1024 * 1024, rmem_max)
    receivers = [
        (name, fn)
        for name, fn, skip in (
            ("collector", step_collector, args.skip_collector),
            ("influxdb", step_influx, args.skip_influx or args.signed),
            ("bare recv", step_bare, args.skip_bare),
        )
        if not skip
    ]
    summary = []
    with tempfile.TemporaryDirectory() as workdir:
        print(
            f"receivers on core {args.collector_core}, sender on core {args.sender_core}; {args.sensors} sensors; "
            f"{'signed; ' if args.signed else ''}{args.seconds:g} s per step; receive buffer {args.rcvbuf:,} bytes "
            f"asked of each; loadavg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        for n in args.readings:
            args.n_readings = n
            best_of = {}
            together = []
            for name, fn in receivers:
                if name == "bare recv" and n != args.readings[0]:
                    best_of[name] = summary[0][1].get(name)  # the ceiling does not depend on the fields
                    continue
                if not args.fixed_rate:
                    together.append((name, fn))
                    continue
                print(f"{name}, {n} readings per datagram:", flush=True)
                if args.fixed_rate:
                    r = fn(args.fixed_rate, args, workdir)
                    r["achieved"] = r["sent"] / r["send_elapsed"]
                    print(
                        f"  {name} {args.fixed_rate:>9,.0f}/s offered: sent {r['sent']:,}, stored/received "
                        f"{r.get('stored', r['received']):,}" + ("  ok" if r["ok"] else "  LOSS"),
                        flush=True,
                    )
                    best_of[name] = r if r["ok"] else dict(r, lossy=True)
            if together:
                print(
                    f"{', '.join(name for name, _ in together)}, {n} readings per datagram, steps in turn:", flush=True
                )
                for name, (best, _) in search_together(together, args, workdir).items():
                    best_of[name] = best
            summary.append((n, best_of))
    print()
    for n, best_of in summary:
        print(f"--- {args.sensors} sensors, {n} readings per datagram ({args.sensors * n:,} series) ---")
        for name, best in best_of.items():
            if best is None:
                print(f"{name:10s}: lost datagrams even at the starting rate")
                continue
            capped = " (the sender's ceiling: the receiver is faster still)" if best.get("sender_capped") else ""
            lost_at = best.get("lost_at")
            capped += f", lost at {lost_at:,.0f}/s" if lost_at else ""
            lossy = " WITH LOSS" if best.get("lossy") else " with zero loss"
            rss = f", peak RSS {best['peak_rss_kb'] / 1024:.1f} MB" if best.get("peak_rss_kb") else ""
            print(
                f"{name:10s}: {best['achieved']:>9,.0f} datagrams/s{lossy} (offered {best['rate']:,.0f}/s, "
                f"{best['sent']:,} sent){capped}{rss}"
            )
        col, inf, bare = (best_of.get(k) for k in ("collector", "influxdb", "bare recv"))
        if col and inf:
            capped = (bool(col.get("sender_capped")), bool(inf.get("sender_capped")))
            bound = {
                (True, True): "both at the sender's ceiling: ",
                (True, False): ">= ",
                (False, True): "<= ",
                (False, False): "",
            }[capped]
            print(f"ratio collector / InfluxDB 1.6: {bound}{col['achieved'] / inf['achieved']:.2f}")
        if col and bare:
            bound = "<= " if bare.get("sender_capped") else ""
            print(f"ratio collector / bare recv: {bound}{col['achieved'] / bare['achieved']:.2f}")


if __name__ == "__main__":
    main()
