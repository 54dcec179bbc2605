"""Uplink benchmark: catch-up to a local JetStream, forward rate, RSS, central rate, ingest beside it.

Gateway databases are filled with a backlog as the collector commits it (one
ingest_log row per second: --sensors sensors sending --rate readings/s in
datagrams of 2 readings), then, against a real nats-server (JetStream, file
store) started here:

1. catch-up: `telemetry-uplink run` (payload 3) drains a --minutes backlog
   (default 60: the target's hour at 10,000 readings/s, 36 million readings,
   measured, not extrapolated) from position 0: time, readings/s, peak RSS
   (VmHWM); a payload-1 uplink drains a 2-minute backlog of the same shape in
   the same run (the baseline, and the ratio);
2. central: --gateways uplinks publish their own copy of a --central-minutes
   backlog (distinct rows) at once, then one `telemetry-uplink consume` drains
   the stream into a central database: readings/s and readings per CPU second
   of the consumer (with --central-baseline, the same backlogs as payload 2
   too: the ratio; the catch-up and payload-1 phases publish to a stream of
   their own, CATCHUP, which the consumer does not read);
3. ingest beside the uplink (skip with --skip-ingest; alone with --ingest-only):
   the collector pinned to core 0 as in bench/ingest.py, the sender, the uplink
   and nats-server on core 1.  --searches zero-loss searches of the collector
   alone and with a live `telemetry-uplink run` following it, their steps taken
   in turn (A B, B A, ...): medians and the ratio (target >= 0.95); then --pairs
   fixed-rate pairs in turn: the collector's CPU per datagram alone and beside
   (its speed on its own core), the frames in use in its WAL, peak and
   time-averaged (a reader holding checkpoints back shows as a WAL past the
   1,000 frames it is checkpointed at), flushes
   SQLite refused, the uplink's and the broker's CPU; and forward rate / ingest
   rate, central rate / (gateways x ingest rate).  A zero-loss search step is one bit (lost or
   not), so a search resolves its last bisection and no finer, and one lossy step moves it by
   that much: with --fixed the collector runs at fixed rates near its edge instead, alone and
   beside the uplink in turn (--rounds of each), and the report gives per rate how many steps
   lost, the datagrams lost (min / median / max), what the collector waited for a core, its
   WAL, and pooled a Fisher test of the lossy steps and a sign test of the pairs.  --placement
   gateway leaves the collector and the uplink unpinned as systemd runs them on a 2-core
   gateway (the sender stands for the network on core 1); --fixed-with uplink-other,
   uplink-batch,uplink-idle compares the uplink's scheduling policies.

    .venv/bin/python bench/uplink.py --ingest-only        # phase 3: ~5 minutes at load 4-6
    .venv/bin/python bench/uplink.py                      # phases 1-3: a few minutes more
    .venv/bin/python bench/uplink.py --minutes 10 --skip-ingest
    .venv/bin/python bench/uplink.py --central-only --central-alone   # phase 2, close workers against one process
    .venv/bin/python bench/uplink.py --fixed 40000,70000 --rounds 8  # phase 3 at fixed rates: ~3 minutes
    .venv/bin/python bench/uplink.py --fixed 50000,80000 --rounds 5 --placement gateway \
        --fixed-with alone,uplink-other,uplink-batch,uplink-idle       # the policies, unpinned: ~4 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from collector import ingestlog, schema  # noqa: E402
from collector.ingestlog import Group  # noqa: E402

# The central target: 3 gateways at the collector's zero-loss ingest rate on the quiet machine
# (224,905 datagrams/s of 2 readings, session 4), and session 4's consumer on the same backlogs.
TARGET_CENTRAL = 3 * 224_905 * 2
SESSION4_CENTRAL = 317_007


def _unit_nice() -> int:
    """Nice= of the uplink's systemd unit: the bench runs the uplink beside the collector as deployed."""
    try:
        m = re.search(r"^Nice=(-?\d+)$", (ROOT / "deploy/systemd/telemetry-uplink.service").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


UNIT_NICE = _unit_nice()


def _unit_policy() -> str:
    """CPUSchedulingPolicy= of the uplink's unit (other when it sets none): as deployed."""
    try:
        m = re.search(
            r"^CPUSchedulingPolicy=(\w+)$", (ROOT / "deploy/systemd/telemetry-uplink.service").read_text(), re.M
        )
    except OSError:
        return "other"
    return m.group(1) if m else "other"


UNIT_POLICY = _unit_policy()


def fill(
    path: str, minutes: float, rate: int, sensors: int, seed: int, distinct: float | None = None
) -> tuple[int, int]:
    """A backlog as the collector commits it: one ingest_log row per second of ingest, each
    sensor sending rate / (2 x sensors) datagrams/s of 2 readings (fractional rates spread
    over the seconds), the sensors' accounts updated each minute and at the end.  Values come
    from a pool (this is about moving data, not about compressing it).  With `distinct`, only
    that many minutes are generated and the rest of the backlog repeats their rows under new
    ids (SQL copies: an hour in seconds): the uplink forwards bodies without decoding them,
    so its work per row is the same; the central side would drop the repeats, so the central
    phase uses distinct data only.  Returns (entries, readings)."""
    db = schema.open_writer(path)
    conn = db.conn
    conn.execute(ingestlog.CREATE_TABLE)
    rng = random.Random(seed)
    pool_t = [round(rng.uniform(15, 25), 2) for _ in range(10_007)]
    pool_h = [round(rng.uniform(30, 60), 1) for _ in range(10_009)]
    per_sensor = rate / (2 * sensors)  # datagrams per sensor per second
    t0 = 1_800_000_000.0
    seq = [0] * sensors
    names = [f"bench-{i:04d}" for i in range(sensors)]
    entries = readings = 0
    offset = 0
    total_seconds = int(minutes * 60)
    seconds = total_seconds if distinct is None else min(total_seconds, int(distinct * 60))

    def accounts(now: float) -> None:
        conn.executemany(
            "INSERT INTO sensors (sensor, first_seen, last_seen, datagrams, readings) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (sensor) DO UPDATE SET last_seen = excluded.last_seen, "
            "datagrams = excluded.datagrams, readings = excluded.readings",
            [(names[i], t0, now, seq[i], 2 * seq[i]) for i in range(sensors)],
        )

    for second in range(seconds):
        groups = []
        for i in range(sensors):
            phase = i / sensors
            n = int((second + 1 + phase) * per_sensor) - int((second + phase) * per_sensor)
            if n == 0:
                continue
            first = seq[i] + 1
            seq[i] += n
            base = t0 + second
            ts = [base + (k + 0.5) / n for k in range(n)]
            offset = (offset + n) % 10_000
            groups.append(
                Group(
                    names[i],
                    1,
                    list(range(first, first + n)),
                    ts,
                    [t + 0.001 for t in ts],
                    {"temp": pool_t[offset : offset + n], "hum": pool_h[offset : offset + n]},
                )
            )
            readings += 2 * n
        conn.execute("BEGIN")
        ingestlog.append(conn, t0 + second + 1, groups)
        if second % 60 == 59 or second == seconds - 1:
            accounts(t0 + second + 1)
        conn.execute("COMMIT")
        entries += 1
    per_copy = readings
    while entries < total_seconds:
        n = min(seconds, total_seconds - entries)
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO ingest_log (committed, datagrams, readings, body) "
            "SELECT committed + ?, datagrams, readings, body FROM ingest_log WHERE id <= ? ORDER BY id",
            (float(entries), n),
        )
        conn.execute("COMMIT")
        readings += (
            per_copy
            if n == seconds
            else conn.execute("SELECT total(readings) FROM ingest_log WHERE id <= ?", (n,)).fetchone()[0]
        )
        entries += n
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return entries, readings


def copy_db(src: str, dst: str) -> None:
    """A gateway's copy of a filled backlog (its own file, its own position)."""
    shutil.copyfile(src, dst)


def vm_hwm_kb(pid: int) -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def start_nats(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("nats-server")
    if binary is None:
        sys.exit("nats-server is not installed: apt-get install nats-server")
    log = workdir / "nats.log"
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(workdir / "js")],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"Listening for client connections on [^\s]*:(\d+)", text)
        if m and "Server is ready" in text:
            return proc, f"nats://127.0.0.1:{m.group(1)}"
        time.sleep(0.05)
    proc.kill()
    sys.exit("nats-server did not start: " + log.read_text()[-500:])


def position(db: str) -> int:
    """The uplink's acked position: its status file's (written when a backlog has drained, else
    at most once a second) or `<db>-uplink`'s (at most every --position-interval), the larger."""
    try:
        written = int(Path(db + "-uplink").read_text())
    except (OSError, ValueError):
        written = 0
    try:
        live = json.loads(Path(db + "-uplink.status.json").read_text()).get("position", 0)
    except (OSError, ValueError, AttributeError):
        live = 0
    return max(written, live if type(live) is int else 0)


def last_log_id(db: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ingest_log'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def uplink_cmd(db: str, name: str, url: str, payload: int, stream: str = "TELEMETRY") -> list[str]:
    """The catch-up phase publishes to a stream of its own (CATCHUP, subjects catchup.>),
    so the central consumer (TELEMETRY, telemetry.>) sees only the central phase."""
    return [
        str(BIN / "telemetry-uplink"),
        "run",
        "--stream",
        stream,
        "--subject-prefix",
        stream.lower(),
        "--db",
        db,
        "--gateway",
        name,
        "--servers",
        url,
        "--payload-version",
        str(payload),
        "--status-interval",
        "3600",
        "--poll-interval",
        "0.05",
    ]


def acked_messages(db: str) -> int | None:
    try:
        return json.loads(Path(db + "-uplink.status.json").read_text())["acked"]
    except (OSError, ValueError, KeyError):
        return None


def drain(
    dbs: dict[str, str], url: str, entries: int, workdir: Path, timeout: float, payload: int = 3, stream="TELEMETRY"
) -> dict:
    """Uplinks for these gateways (name -> database) at once, from position 0 until each has
    acked its whole log: elapsed time, the uplinks' peak RSS, messages acked."""
    procs = {}
    start = time.monotonic()
    for name, db in dbs.items():
        log = workdir / f"uplink-{name}-p{payload}.log"
        procs[name] = (
            subprocess.Popen(
                uplink_cmd(db, name, url, payload, stream), stdout=open(log, "wb"), stderr=subprocess.STDOUT
            ),
            log,
        )
    peak = 0
    try:
        while any(position(db) < entries for db in dbs.values()):
            for name, (proc, log) in procs.items():
                if proc.poll() is not None or time.monotonic() - start > timeout:
                    raise SystemExit(f"uplink {name} stopped or timed out: {log.read_text()[-800:]}")
                peak = max(peak, vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        for proc, _ in procs.values():
            peak = max(peak, vm_hwm_kb(proc.pid) or 0)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)
    return dict(elapsed=elapsed, peak_rss_kb=peak, messages=sum(acked_messages(db) or 0 for db in dbs.values()))


def cpu_seconds(pid: int) -> float:
    """CPU time of a live process so far, in seconds: its threads' run time in ns
    (/proc/PID/task/*/schedstat), else utime + stime in clock ticks (/proc/PID/stat)."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_events(pid: int) -> dict[str, int]:
    """Minor page faults (/proc/PID/stat) and voluntary / involuntary context switches
    (/proc/PID/status, summed over the threads' task entries) of a live process so far."""
    out = {"minflt": 0, "vol_cs": 0, "invol_cs": 0}
    try:
        out["minflt"] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "status").read_text()
            out["vol_cs"] += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
            out["invol_cs"] += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
    except (OSError, AttributeError, ValueError):
        pass
    return out


def flush_histogram(log: Path) -> dict[str, float]:
    """The collector's flush-duration histogram (its Prometheus exporter, whose address it logged):
    cumulative counts by upper bound ("0.025", ..., "+Inf") and "sum" (seconds)."""
    import urllib.request

    m = re.search(r"metrics on (http://\S+/metrics)", log.read_text(errors="replace"))
    if not m:
        return {}
    text = urllib.request.urlopen(m.group(1), timeout=10).read().decode()
    out = {}
    for name, le, value in re.findall(
        r'^(telemetry_collector_flush_duration_seconds_(?:bucket|sum))(?:\{le="([^"]+)"\})? (\S+)$', text, re.M
    ):
        out["sum" if name.endswith("_sum") else le] = float(value)
    return out


def run_wait_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (/proc/PID/schedstat):
    on a pinned collector, what other processes on its core took from it."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def central_readings(path: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM counters WHERE name = 'uplink_readings'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out |= {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                pass
    except OSError:
        pass
    return out


def consume(
    url: str,
    total: int,
    workdir: Path,
    timeout: float,
    stream: str = "TELEMETRY",
    close_workers: int | None = None,
    tag: str = "",
    head_budget: float | None = None,
    bin_dir: Path = BIN,
    broker_pid: int | None = None,
) -> dict:
    """One `telemetry-uplink consume` (a durable of its own) drains `total` readings of the stream
    into a new central database: time, CPU of the writer and of its close workers, peak RSS of
    each (VmHWM, sampled every 50 ms), and `timeline`: (seconds since start, writer CPU s, workers'
    CPU s, broker CPU s, readings stored) at each sample, for each one's share of a core over time."""
    central = str(workdir / f"central-{stream}{tag}.db")
    log = workdir / f"consume-{stream}{tag}.log"
    cmd = [str(bin_dir / "telemetry-uplink"), "consume", "--db", central, "--servers", url, "--status-interval", "3600"]
    cmd += ["--stream", stream, "--subject-prefix", stream.lower(), "--durable", f"bench{tag or '-central'}"]
    if close_workers is not None:
        cmd += ["--close-workers", str(close_workers)]
    if head_budget is not None:
        cmd += ["--head-budget", str(head_budget)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    peak = 0
    workers: dict[int, tuple[int, float]] = {}  # pid -> (peak RSS kB, CPU seconds), as last seen
    timeline: list[tuple[float, float, float, float, int]] = []
    broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    try:
        while (stored := central_readings(central)) < total:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise SystemExit(
                    f"consumer stopped or timed out at {central_readings(central)}: {log.read_text()[-800:]}"
                )
            peak = max(peak, vm_hwm_kb(proc.pid) or 0)
            for child in children_of(proc.pid):
                hwm, cpu = workers.get(child, (0, 0.0))
                workers[child] = (max(hwm, vm_hwm_kb(child) or 0), max(cpu, cpu_seconds(child)))
            timeline.append(
                (
                    time.monotonic() - start,
                    cpu_seconds(proc.pid),
                    sum(c for _, c in workers.values()),
                    (cpu_seconds(broker_pid) - broker0) if broker_pid else 0.0,
                    stored,
                )
            )
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(proc.pid)
        for child in children_of(proc.pid):
            hwm, wcpu = workers.get(child, (0, 0.0))
            workers[child] = (max(hwm, vm_hwm_kb(child) or 0), max(wcpu, cpu_seconds(child)))
    finally:
        proc.terminate()
        proc.wait(30)
    return dict(
        elapsed=elapsed,
        peak_rss_kb=peak,
        stored=central_readings(central),
        cpu=cpu,
        workers=len(workers),
        worker_cpu=sum(c for _, c in workers.values()),
        worker_rss_kb=max((h for h, _ in workers.values()), default=0),
        db_bytes=os.path.getsize(central),
        timeline=timeline,
    )


def timeline_line(timeline: list[tuple[float, float, float, float, int]], step: float = 1.0) -> str:
    """Each one's share of a core per `step` seconds of a consume() timeline (writer / workers /
    broker, percent), and when the first reading was stored."""
    first = next((t for t, *_, n in timeline if n > 0), None)
    parts, prev = [], None
    for sample in timeline:
        if prev is None or sample[0] - prev[0] >= step:
            if prev is not None:
                dt = sample[0] - prev[0]
                shares = "/".join(f"{100 * (sample[k] - prev[k]) / dt:.0f}" for k in (1, 2, 3))
                parts.append(f"{prev[0]:.0f}-{sample[0]:.0f} s {shares}")
            prev = sample
    start = "-" if first is None else f"{first:.2f} s"
    return f"first readings stored at {start}; % of a core writer/workers/broker: " + ", ".join(parts)


def _load_ingest_bench():
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pin(pid: int, core: int | None) -> None:
    """Every thread of a running process onto one core (nats-server starts its threads early)."""
    if core is not None and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, capture_output=True)


def wal_bytes(db: str) -> int:
    try:
        return os.path.getsize(db + "-wal")
    except OSError:
        return 0


def wal_frames(db: str) -> int:
    """Frames in use in the WAL now: mxFrame of the WAL-index header at the start of the -shm file
    (SQLite's wal.c, WalIndexHdr; native byte order).  The -wal file only shrinks to
    journal_size_limit: its size is where the WAL once reached, this is what it holds."""
    try:
        with open(db + "-shm", "rb") as f:
            head = f.read(48)
    except OSError:
        return 0
    return struct.unpack_from("=I", head, 16)[0] if len(head) == 48 else 0


def thread_cores(pid: int) -> list[int]:
    """The core each thread of a process runs on or last ran on (/proc/PID/task/*/stat, field 39)."""
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[36]))
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return out


class Sampler:
    """Samples, every `every` seconds in a thread, the frames in use in the collector's WAL and
    the -wal file's size.  SQLite checkpoints after the commit that takes the WAL to 1,000 frames
    and the next commit starts it again from the top, unless a reader's snapshot still needs the
    frames: a WAL past ~1,000 frames is a checkpoint held back."""

    def __init__(self, db: str, pids: dict[str, int] | None = None, every: float = 0.05) -> None:
        import threading

        self.db = db
        self.pids = pids or {}
        # label -> core -> samples of its threads found running or last run there (/proc stat field 39)
        self.cores: dict[str, dict[int, int]] = {k: {} for k in self.pids}
        self.every = every
        self.peak = 0
        self.peak_frames = 0
        self.total_frames = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, wal_bytes(self.db))
            frames = wal_frames(self.db)
            self.peak_frames = max(self.peak_frames, frames)
            self.total_frames += frames
            self.samples += 1
            for label, pid in self.pids.items():
                for core in thread_cores(pid):
                    self.cores[label][core] = self.cores[label].get(core, 0) + 1

    def stop(self) -> tuple[int, int, float]:
        """(the -wal file's peak bytes, peak frames in use, mean frames in use) over the samples."""
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_frames, self.total_frames / max(1, self.samples)


# What runs on core 1 beside the collector in a --neighbours step (the sender is always there):
# each isolates one part of what a live uplink does, to find what it costs the collector.
NEIGHBOURS = {
    "alone": "nothing else",
    "burner": "a CPU burner at nice 19 (core 1 never idle: the floor of what anything beside can be)",
    "reader": "the uplink's read transactions (payload 3 rounds, polling as deployed), the position file "
    "written after each round without fsync; nothing published",
    "reader-fsync": "the same, the position file fsync'd after each round as the uplink did until session 5",
    "uplink": "a live telemetry-uplink run publishing to the local nats-server",
    # amplified suspects: what each does many times more often than a deployed uplink
    "fsync20": "the position file (far ahead: the collector trims as alone) written and fsync'd 20 times a second (file and directory), nothing read",
    "reader-busy": "the reader polling every 10 ms instead of 0.5 s, no fsync",
    "uplink-eager": "the live uplink writing its position file (fsync'd) after every round, as before session 5",
    # the live uplink under each scheduling policy whatever its unit says (chrt), at --uplink-nice
    "uplink-other": "the live uplink at SCHED_OTHER (its wake-ups may preempt what runs on its core)",
    "uplink-batch": "the live uplink at SCHED_BATCH (never preempts on waking; a nice-weighted share)",
    "uplink-idle": "the live uplink at SCHED_IDLE (runs only on an otherwise idle core, or nearly)",
}


def reader_loop(db: str, poll: float, durable: bool) -> None:
    """--_reader: the uplink's reads of the collector's database without a broker: Source.read
    as a payload-3 round does (its limits), the position file after each round that found
    something (fsync'd with `durable`), `poll` seconds of sleep after one that found nothing."""
    from collector.uplink import source

    source.write_cursor(db, 0) if durable else source.write_atomically(source.cursor_path(db), b"0\n", False)
    src = source.Source(db, "bench")
    cursor = 0
    print("ready", flush=True)
    while True:
        snap = src.read(cursor, 1000, 2_000_000, raw=True, max_bytes=4 << 20)
        ids = snap.ids
        if not ids and not snap.accounts:
            time.sleep(poll)
            continue
        if ids:
            cursor = ids[-1]
            if durable:
                source.write_cursor(db, cursor)
            else:
                source.write_atomically(source.cursor_path(db), f"{cursor}\n".encode(), False)
        src.mark_published(snap.account_rows)


def neighbour_cmd(name: str, db: str, url: str, args) -> list[str] | None:
    """The command of a --neighbours step's neighbour on core 1 (None: nothing)."""
    if name == "alone":
        return None
    if name == "burner":
        return ["nice", "-n", "19", sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"]
    if name in ("reader", "reader-fsync", "reader-busy"):
        poll = 0.01 if name == "reader-busy" else args.poll_interval
        cmd = [sys.executable, __file__, "--_reader", db, "--poll-interval", str(poll)]
        return cmd + (["--_durable"] if name == "reader-fsync" else [])
    if name == "fsync20":
        code = (
            "import sys, time\nsys.path.insert(0, sys.argv[2])\nfrom collector.uplink import source\n"
            "print('ready', flush=True)\nn = 0\nwhile True:\n"
            "    source.write_cursor(sys.argv[1], 10**12)\n    time.sleep(0.05)\n"
        )
        return [sys.executable, "-c", code, db, str(ROOT)]
    cmd = uplink_cmd(db, "bench-ingest", url, 3)
    cmd[cmd.index("--poll-interval") + 1] = str(args.poll_interval)
    policy = name.split("-", 1)[1] if name in ("uplink-other", "uplink-batch", "uplink-idle") else args.uplink_policy
    # chrt as systemd's CPUSchedulingPolicy= does (before exec); nice after it (SCHED_IDLE ignores it)
    chrt = ["chrt", f"--{policy}", "0"] if policy != "other" and shutil.which("chrt") else []
    nice = ["nice", "-n", str(args.uplink_nice)] if args.uplink_nice else []
    return chrt + nice + cmd + (["--position-interval", "0.000001"] if name == "uplink-eager" else [])


def ingest_step(
    mod,
    rate: float,
    beside: bool,
    args,
    url: str,
    nats_pid: int,
    workdir: Path,
    neighbour: str | None = None,
    flushes: bool = False,
) -> dict:
    """One step of bench/ingest.py's search (the collector on its own core, the sender on the
    other), with, if `beside`, a `telemetry-uplink run` publishing the collector's database to
    the nats-server: the uplink and nats-server on the sender's core, the uplink started and
    connected before the first datagram (a deployed uplink runs for months: its start-up is not
    what ingest pays), polling as deployed (0.5 s).  Measured besides bench/ingest.py's
    counts: the collector's CPU seconds from the first datagram until it stored the last
    (per datagram), the WAL's peak size, the uplink's and the broker's CPU over the same time."""
    neighbour = neighbour or ("uplink" if beside else "alone")
    beside = neighbour != "alone"
    step_dir = Path(tempfile.mkdtemp(prefix=f"{neighbour}-{int(rate)}-", dir=workdir))
    db = str(step_dir / "telemetry.db")
    log = step_dir / "collector.log"
    up = None
    out: dict = {"rate": rate, "beside": beside, "neighbour": neighbour}
    try:
        proc, port = mod.start_collector(Path(db), log, args, ("--metrics", "127.0.0.1:0") if flushes else ())
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    try:
        if beside:
            up_log = step_dir / "uplink.log"
            up_cmd = [*mod.taskset(args.uplink_core), *neighbour_cmd(neighbour, db, url, args)]
            up = subprocess.Popen(up_cmd, stdout=open(up_log, "wb"), stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60  # a loaded box starts Python slowly
            ready = "connected to" if neighbour.startswith("uplink") else "ready"
            while ready not in up_log.read_text(errors="replace"):
                if up.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"uplink did not connect: {up_log.read_text()[-800:]}")
                time.sleep(0.02)
        sampler = Sampler(db, {"collector": proc.pid, **({"uplink": up.pid} if up else {})})
        e0 = proc_events(proc.pid)
        c0, n0, w0 = cpu_seconds(proc.pid), cpu_seconds(nats_pid), run_wait_seconds(proc.pid)
        u0 = cpu_seconds(up.pid) if up else 0.0
        t0 = time.monotonic()
        sent = mod.run_sender(port, rate, args.seconds, args.sensors, args.sender_core, False, args.n_readings)
        out["send_wait"] = run_wait_seconds(proc.pid) - w0
        # until the collector stored everything it received (or stopped making progress)
        last, still = -1, 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
            c = mod.read_counters(db)
            if c.get("stored", 0) + c.get("kernel_drops", 0) >= sent["sent"]:
                break  # every datagram stored or counted dropped (drops after the last one received wait below)
            progress = c.get("stored", 0)
            still = still + 1 if progress == last else 0
            if still >= 60:  # 3 s without a flush: the rest was lost
                break
            last = progress
        t1 = time.monotonic()
        c1, n1, w1 = cpu_seconds(proc.pid), cpu_seconds(nats_pid), run_wait_seconds(proc.pid)
        e1 = proc_events(proc.pid)
        out.update({k: e1[k] - e0[k] for k in e0})
        if flushes:
            out["flushes"] = flush_histogram(log)
        u1 = cpu_seconds(up.pid) if up else 0.0
        out["wal_peak"], out["wal_frames_peak"], out["wal_frames_mean"] = sampler.stop()
        out["cores"] = sampler.cores
        out["wal_end"] = wal_bytes(db)
        elapsed = out["elapsed"] = t1 - t0
        out["collector_cpu"] = c1 - c0
        out["run_wait"] = w1 - w0
        out["uplink_cpu_share"] = (u1 - u0) / elapsed if up else None
        out["broker_cpu_share"] = (n1 - n0) / elapsed
    finally:
        mod.stop_process(proc)
        if up is not None and not neighbour.startswith("uplink"):
            up.terminate()
            up.wait(30)
        elif up is not None:
            deadline = time.monotonic() + 30
            target = last_log_id(db)
            while position(db) < target and time.monotonic() < deadline and up.poll() is None:
                time.sleep(0.05)
            out["uplink_behind"] = max(0, target - position(db))
            up.terminate()
            up.wait(30)
            try:
                st = json.loads(Path(db + "-uplink.status.json").read_text())
                out["uplink_rounds"] = st["rounds"]
                out["uplink_reads"] = st.get("reads")  # None: an uplink from before session 5
                out["uplink_position_writes"] = st.get("position_writes")
                out["uplink_life"] = time.time() - st["started"] if "started" in st else None
            except (OSError, ValueError, KeyError):
                pass
    c = mod.read_counters(Path(db))
    stored = int(c.get("stored", 0))
    out.update(
        sent=sent["sent"],
        send_elapsed=sent["elapsed"],
        sender_behind=sent.get("behind_max", 0.0),
        received=int(c.get("received", 0)),
        stored=stored,
        stored_readings=int(c.get("stored_readings", 0)),
        kernel_drops=int(c.get("kernel_drops", 0)),
        storage_dropped=int(c.get("storage_dropped", 0)),
        refused_flushes=log.read_text(errors="replace").count("cannot write to"),
        ok=stored == sent["sent"] and int(c.get("kernel_drops", 0)) == 0,
        cpu_us_per_datagram=1e6 * out["collector_cpu"] / max(1, int(c.get("received", 0))),
    )
    shutil.rmtree(step_dir, ignore_errors=True)
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _step_line(label: str, r: dict) -> str:
    extra = ""
    if r["beside"]:
        extra = f", {r['neighbour']} {100 * r['uplink_cpu_share']:.0f} % / broker {100 * r['broker_cpu_share']:.0f} % of a core"
        if r.get("uplink_behind"):
            extra += f", UPLINK BEHIND by {r['uplink_behind']} entries"
    return (
        f"  {label:7s} {r['rate']:>9,.0f} datagrams/s offered, {r['sent'] / r['send_elapsed']:>9,.0f} sent: "
        f"stored {r['stored']:,} of {r['sent']:,}, kernel drops {r['kernel_drops']}; collector "
        f"{r['cpu_us_per_datagram']:.2f} us CPU/datagram, waited {1000 * r['run_wait']:.0f} ms for its core, "
        f"WAL at most {r['wal_frames_peak']} frames, sender late by {1000 * r.get('sender_behind', 0):.1f} ms at most"
        + extra
        + ("  ok" if r["ok"] else "  LOSS")
    )


def ingest_settings(args) -> argparse.Namespace:
    """bench/ingest.py's step settings for the ingest phases: the collector on core 0, the rest on core 1."""
    try:
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        rmem_max = 8 * 1024 * 1024
    a = argparse.Namespace(
        seconds=args.ingest_seconds,
        sensors=args.ingest_sensors,
        n_readings=2,
        start=args.ingest_start,
        max_rate=400_000,
        bisect_steps=args.bisect_steps,
        resolution=args.resolution,
        collector_core=0,
        sender_core=1,
        flush_interval=1.0,
        batch_size=20_000,
        rcvbuf=min(8 * 1024 * 1024, rmem_max),
        poll_interval=args.poll_interval,
        uplink_nice=args.uplink_nice,
        uplink_policy=args.uplink_policy,
        uplink_core=1,
        placement=args.placement,
    )
    if args.placement == "gateway":
        # As on a 2-core gateway under systemd (no CPUAffinity=): the collector and the uplink
        # go where the scheduler puts them; the sender stands for the network (softirqs of a
        # loopback send run on the sending core) and stays on core 1 with the broker.
        a.collector_core = a.uplink_core = None
    if (os.cpu_count() or 1) < 2:
        a.collector_core = a.sender_core = a.uplink_core = None
    return a


def placement_line(a) -> str:
    where = {None: "any core"} | {c: f"core {c}" for c in (0, 1)}
    return (
        f"collector on {where[a.collector_core]}; uplink on {where[a.uplink_core]} (poll {a.poll_interval:g} s, "
        f"SCHED_{a.uplink_policy.upper()}, nice {a.uplink_nice}); sender and nats-server on {where[a.sender_core]}"
    )


def ingest_beside(url: str, nats_pid: int, args, workdir: Path) -> dict:
    """Ingest unchanged beside the uplink?  The collector pinned to one core as in
    bench/ingest.py; the sender, the uplink and nats-server on the other.  --searches times:
    bench/ingest.py's zero-loss search of the collector alone and of the collector with the
    uplink, their steps in turn (A B, B A, ...), the searches in turn too; then --pairs fixed-rate
    pairs (A B, B A, ...) at half the alone median, for the collector's CPU per datagram and the
    WAL beside the uplink.  Medians of each, and the ratios."""
    mod = _load_ingest_bench()
    a = ingest_settings(args)
    pin(nats_pid, a.sender_core)
    print(
        f"ingest beside the uplink: {placement_line(a)}; {a.sensors} sensors, "
        f"{a.n_readings} readings a datagram, {a.seconds:g} s a step",
        flush=True,
    )
    steps_of: dict[str, list[dict]] = {"alone": [], "beside": []}

    def measured(rate: float, beside: bool, wd: Path, seconds: float) -> dict:
        """One step; a lossy one during whose send the collector waited for its core more than
        --disturbed of the time (a process from elsewhere on that core) is taken again, at most
        --retakes times, for alone and beside alike."""
        label = "beside" if beside else "alone"
        for attempt in range(args.retakes + 1):
            r = ingest_step(mod, rate, beside, argparse.Namespace(**dict(vars(a), seconds=seconds)), url, nats_pid, wd)
            print(_step_line(label, r), flush=True)
            disturbed = not r["ok"] and r["send_wait"] > args.disturbed * r["send_elapsed"]
            if not disturbed:
                break
            r["disturbed"] = True
            print(
                f"    (disturbed: the collector waited {r['send_wait']:.2f} s of the {r['send_elapsed']:.2f} s send "
                f"for core {a.collector_core}" + ("; taken again)" if attempt < args.retakes else "; kept)"),
                flush=True,
            )
        return r

    def runner(beside: bool):
        def step(rate, _a, wd):
            r = measured(rate, beside, Path(wd), a.seconds)
            steps_of["beside" if beside else "alone"].append(r)
            return r

        return step

    best: dict[str, list[dict]] = {"alone": [], "beside": []}
    for k in range(args.searches):
        order = [("alone", runner(False)), ("beside", runner(True))]
        if k % 2:
            order.reverse()
        print(f" search {k + 1} of {args.searches}, steps in turn:", flush=True)
        mod._print_step = lambda *_: None  # ingest_step prints its own line
        with tempfile.TemporaryDirectory(dir=workdir) as wd:
            for label, (b, _results) in mod.search_together(order, a, wd).items():
                if b is not None:
                    best[label].append(b)
    out: dict = {"best": best, "steps": steps_of, "pairs": {"alone": [], "beside": []}}
    if (best["alone"] or args.pair_rate) and args.pairs:
        rate = args.pair_rate or round(median([b["rate"] for b in best["alone"]]) / 2, -3)
        out["pair_rate"] = rate
        print(
            f" {args.pairs} pairs of {args.pair_seconds:g} s at {rate:,.0f} datagrams/s (collector CPU per datagram, "
            "WAL), in turn:",
            flush=True,
        )
        for k in range(args.pairs):
            for beside in (False, True) if k % 2 == 0 else (True, False):
                r = measured(rate, beside, workdir, args.pair_seconds)
                out["pairs"]["beside" if beside else "alone"].append(r)
    out["n_readings"] = a.n_readings
    return out


def fisher_p(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact p of the 2x2 table [[a, b], [c, d]] (rows: conditions; columns:
    lossy steps, clean steps): the chance of a split at least this uneven with no difference."""
    from math import comb

    row1, col1, n = a + b, a + c, a + b + c + d

    def p_of(x: int) -> float:
        return comb(col1, x) * comb(n - col1, row1 - x) / comb(n, row1)

    observed = p_of(a)
    xs = range(max(0, row1 + col1 - n), min(row1, col1) + 1)
    return min(1.0, sum(p_of(x) for x in xs if p_of(x) <= observed * (1 + 1e-9)))


def sign_p(more: int, fewer: int) -> float:
    """Two-sided sign test: the chance of a split of more/fewer at least this uneven by coin tosses."""
    from math import comb

    n, k = more + fewer, min(more, fewer)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def spread(xs: list[float], fmt: str = ",.0f") -> str:
    """min / median / max."""
    return " / ".join(format(v, fmt) for v in (min(xs), median(xs), max(xs))) if xs else "-"


def cores_line(steps: list[dict], label: str) -> str:
    """Share of the samples that found `label`'s threads on each core, over the steps."""
    total: dict[int, int] = {}
    for r in steps:
        for core, n in (r.get("cores") or {}).get(label, {}).items():
            total[core] = total.get(core, 0) + n
    n = sum(total.values())
    return ", ".join(f"core {c} {100 * k / n:.0f} %" for c, k in sorted(total.items())) if n else "-"


def fixed_phase(url: str, nats_pid: int, args, workdir: Path) -> None:
    """--fixed: the collector at fixed rates near its zero-loss edge, alone and beside each of
    --fixed-with's neighbours, --rounds rounds; in each round every rate, and at each rate every
    condition once, the order rotated each round (A B, B A, ...) so load from elsewhere falls on
    all alike.  No step is taken again.  What a search's one-bit steps (lost or not) cannot
    show: per rate and condition how many steps lost, the datagrams lost (min / median / max),
    what the collector waited for a core, its WAL; pooled: a Fisher exact test of the lossy
    steps and a sign test of the pairs (same round, same rate: who lost more)."""
    mod = _load_ingest_bench()
    a = ingest_settings(args)
    pin(nats_pid, a.sender_core)
    names = args.fixed_with
    print(
        f"fixed rates {', '.join(f'{r:,.0f}' for r in args.fixed)} datagrams/s of {a.n_readings} readings, "
        f"{a.seconds:g} s a step, {args.rounds} rounds; {placement_line(a)}; {a.sensors} sensors",
        flush=True,
    )
    for n in names:
        print(f"  {n:13s} {NEIGHBOURS[n]}")
    res: dict[tuple[float, str], list[dict]] = {(r, n): [] for r in args.fixed for n in names}
    for k in range(args.rounds):
        rates = args.fixed[k % len(args.fixed) :] + args.fixed[: k % len(args.fixed)]
        for rate in rates:
            order = names[k % len(names) :] + names[: k % len(names)]
            for n in order:
                r = ingest_step(mod, rate, n != "alone", a, url, nats_pid, workdir, neighbour=n)
                print(_step_line(f"{n} r{k + 1}", r) + f" (load {os.getloadavg()[0]:.1f})", flush=True)
                res[(rate, n)].append(r)
    print()
    lost_of = lambda r: r["sent"] - r["stored"]  # noqa: E731
    for rate in args.fixed:
        print(f"at {rate:,.0f} datagrams/s ({rate * a.n_readings:,.0f} readings/s), {args.rounds} steps each:")
        for n in names:
            rs = res[(rate, n)]
            lossy = sum(1 for r in rs if not r["ok"])
            print(
                f"  {n:13s} lossy {lossy} of {len(rs)}; datagrams lost a step min/median/max "
                f"{spread([lost_of(r) for r in rs])} ({100 * sum(lost_of(r) for r in rs) / sum(r['sent'] for r in rs):.3f} % "
                f"of all sent); collector waited for a core {spread([1000 * r['run_wait'] for r in rs])} ms, "
                f"CPU {spread([r['cpu_us_per_datagram'] for r in rs], '.2f')} us/datagram; WAL frames in use at most "
                f"{spread([r['wal_frames_peak'] for r in rs])}, time-averaged {median([r['wal_frames_mean'] for r in rs]):,.0f}"
                f", -wal file at most {max(r['wal_peak'] for r in rs) / 2**20:.1f} MiB; sender late by at most "
                f"{1000 * max(r.get('sender_behind', 0) for r in rs):.1f} ms"
            )
    base = names[0]
    every = {n: [r for rate in args.fixed for r in res[(rate, n)]] for n in names}
    print(f"pooled over the rates ({len(every[base])} steps each):")
    for n in names:
        rs = every[n]
        lossy = sum(1 for r in rs if not r["ok"])
        line = f"  {n:13s} lossy {lossy} of {len(rs)}"
        if n != base:
            b_lossy = sum(1 for r in every[base] if not r["ok"])
            more = fewer = 0
            for rate in args.fixed:
                for x, y in zip(res[(rate, n)], res[(rate, base)]):
                    more += lost_of(x) > lost_of(y)
                    fewer += lost_of(x) < lost_of(y)
            line += (
                f" against {b_lossy} of {len(every[base])} {base}: Fisher p = "
                f"{fisher_p(lossy, len(rs) - lossy, b_lossy, len(every[base]) - b_lossy):.2f}; pairs (same round and "
                f"rate) where it lost more than {base}: {more}, fewer: {fewer}, as many: {len(rs) - more - fewer} "
                f"(sign test p = {sign_p(more, fewer):.2f})"
            )
        calm = [r for r in rs if r["send_wait"] <= args.disturbed * r["send_elapsed"]]
        line += (
            f"; of the steps whose collector waited for a core under {100 * args.disturbed:.0f} % of the send, "
            f"{sum(1 for r in calm if not r['ok'])} of {len(calm)} lossy"
        )
        up = [r["uplink_cpu_share"] for r in rs if r.get("uplink_cpu_share") is not None]
        behind = sum(1 for r in rs if r.get("uplink_behind"))
        line += (
            f"; collector's cores {cores_line(rs, 'collector')}"
            + (f"; its own cores {cores_line(rs, 'uplink')}, {100 * median(up):.1f} % of a core" if up else "")
            + (f"; BEHIND at the end of {behind} steps" if behind else "")
        )
        print(line)
    every_step = [r for rs in every.values() for r in rs]
    print(
        f"flushes the database refused over all {len(every_step)} steps: {sum(r['refused_flushes'] for r in every_step)}"
    )


def bracketed(names: list[str], rounds: int) -> list[str]:
    """The run order of a --neighbours phase: each round takes every other neighbour once
    (rotated each round), each run preceded by a run of the baseline (names[0]), and one
    baseline run closes the sequence: every neighbour's run has a baseline run on either side,
    so drift of a shared machine's speed falls on its ratio as little as it can."""
    base, others = names[0], names[1:]
    seq: list[str] = []
    for k in range(rounds):
        for n in others[k % len(others) :] + others[: k % len(others)]:
            seq += [base, n]
    return seq + [base]


def bracket_ratios(seq: list[str], values: list[float]) -> dict[str, list[float]]:
    """Per neighbour run: the mean of the baseline runs on either side over its own value
    (CPU per datagram: > 1 means the collector did its work faster beside it)."""
    out: dict[str, list[float]] = {}
    for i, name in enumerate(seq):
        if name != seq[0]:
            out.setdefault(name, []).append((values[i - 1] + values[i + 1]) / 2 / values[i])
    return out


def neighbours_phase(url: str, nats_pid: int, args, workdir: Path) -> None:
    """--neighbours: what each part of the uplink costs the collector.  Fixed-rate steps
    (--pair-rate, --pair-seconds) of the collector on core 0 with each neighbour on core 1
    beside the sender (NEIGHBOURS), --pairs rounds, the neighbours taken in turn and in a
    rotated order each round (load from elsewhere falls on all of them alike).  Prints the
    collector's median CPU per datagram with each and its ratio to `alone` (datagrams per
    CPU-second, neighbour / alone), what it waited for its core, its context switches and
    page faults, and the neighbour's own CPU."""
    mod = _load_ingest_bench()
    a = ingest_settings(args)
    pin(nats_pid, a.sender_core)
    names = args.neighbours
    rate = args.pair_rate or 95_000
    print(
        f"neighbours: {placement_line(a).replace('uplink', 'each neighbour')}; "
        f"{a.sensors} sensors at {rate:,.0f} datagrams/s, {args.pair_seconds:g} s a step, {args.pairs} rounds",
        flush=True,
    )
    for n in names:
        print(f"  {n:13s} {NEIGHBOURS[n]}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    step_args = argparse.Namespace(**dict(vars(a), seconds=args.pair_seconds))
    seq = bracketed(names, args.pairs)
    every = []
    for n in seq:
        r = ingest_step(mod, rate, n != "alone", step_args, url, nats_pid, workdir, neighbour=n, flushes=True)
        print(_step_line(n, r), flush=True)
        results[n].append(r)
        every.append(r["cpu_us_per_datagram"])
    ratios = bracket_ratios(seq, every)
    print()
    print(
        f"collector at {rate:,.0f} datagrams/s, medians (ratio: the {names[0]} steps on either side over the "
        "neighbour's, CPU per datagram, median over the neighbour's steps):"
    )
    for n in names:
        rs = results[n]
        cpu = median([r["cpu_us_per_datagram"] for r in rs])
        per_s = {k: median([r[k] / r["elapsed"] for r in rs]) for k in ("vol_cs", "invol_cs", "minflt")}
        lost = sum(r["sent"] - r["stored"] for r in rs)
        own = [r["uplink_cpu_share"] for r in rs if r["uplink_cpu_share"] is not None]
        fl = [r.get("flushes") or {} for r in rs]
        n_fl = sum(f.get("+Inf", 0) for f in fl)
        slow = {b: sum(f.get("+Inf", 0) - f.get(b, 0) for f in fl) for b in ("0.025", "0.05")}
        flush_ms = 1000 * sum(f.get("sum", 0) for f in fl) / max(1, n_fl)
        steps = ", ".join(f"{r['cpu_us_per_datagram']:.2f}" for r in rs)
        print(
            f"  {n:13s} {cpu:.2f} us CPU/datagram ("
            + (f"ratio {median(ratios[n]):.3f}; " if n in ratios else "")
            + f"steps {steps}); waited "
            f"{1000 * median([r['run_wait'] for r in rs]):.0f} ms for its core; context switches "
            f"{per_s['vol_cs']:,.0f}/s voluntary, {per_s['invol_cs']:,.0f}/s involuntary; "
            f"{per_s['minflt']:,.0f} minor faults/s; the sender fell behind its schedule by at most "
            f"{1000 * median([r['sender_behind'] for r in rs]):.1f} ms (median of steps); {n_fl:.0f} flushes of {flush_ms:.1f} ms on average, "
            f"{slow['0.025']:.0f} over 25 ms, {slow['0.05']:.0f} over 50 ms; lost {lost}"
            + (f"; the neighbour used {100 * median(own):.1f} % of a core" if own else "")
            + (
                f"; the uplink per second of its life: {median([r['uplink_rounds'] / r['uplink_life'] for r in rs]):.1f} "
                f"rounds, {median([r['uplink_reads'] / r['uplink_life'] for r in rs]):.1f} read transactions, "
                f"{median([r['uplink_position_writes'] / r['uplink_life'] for r in rs]):.2f} position writes (each "
                "2 fsyncs: file, directory)"
                if all(r.get("uplink_reads") is not None and r.get("uplink_life") for r in rs)
                else ""
            )
        )


def core_phase(url: str, nats_pid: int, args, workdir: Path) -> None:
    """--in-process: the collector's work without sockets or a sender (bench/ingest_core.py's
    harness: a real Collector's _process in bursts of 256 pre-encoded datagrams, a flush each
    --batch-size readings, full heads closed between bursts), as fast as it goes, in this
    process pinned to core 0; each neighbour on core 1 follows the same database file, runs in
    turn.  CPU time (process time) per datagram, all of it and the flushes' share, is the
    collector's work whatever waits the scheduler adds: what the neighbour's I/O, locks and
    cache traffic cost it.  The longest flush in wall milliseconds too."""
    from collector import wire
    from collector.server import Collector, Settings

    spec = importlib.util.spec_from_file_location("bench_ingest_core", ROOT / "bench" / "ingest_core.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)

    cores = os.sched_getaffinity(0)
    if len(cores) >= 2:
        os.sched_setaffinity(0, {0})
    pin(nats_pid, 1)
    names = args.neighbours
    t0 = 1_700_000_000.0
    n = args.core_datagrams
    readings = {"temp": 21.53, "hum": 40.2}
    data = [wire.encode(f"bench-{i % 100:04d}", i // 100, readings, boot=1, ts=t0 + i // 100) for i in range(n)]
    print(
        f"in-process collector on core 0 ({n:,} datagrams of 2 readings from 100 sensors a run, flush every "
        f"20,000 readings, as fast as it goes); each neighbour on core 1 following the same file; "
        f"{args.pairs} rounds",
        flush=True,
    )
    results: dict[str, list[dict]] = {k: [] for k in names}
    seq = bracketed(names, args.pairs)
    every, every_flush = [], []
    for name in seq:
        d = Path(tempfile.mkdtemp(prefix=f"core-{name}-", dir=workdir))
        db = str(d / "telemetry.db")
        clock = [t0]
        c = Collector(Settings(db=db, listen=(("127.0.0.1", 0),)), clock=lambda: clock[0])
        nb = None
        try:
            cmd = neighbour_cmd(name, db, url, args)
            if cmd is not None:
                nb_log = d / "neighbour.log"
                nb = subprocess.Popen(["taskset", "-c", "1", *cmd], stdout=open(nb_log, "wb"), stderr=subprocess.STDOUT)
                ready = "connected to" if name.startswith("uplink") else "ready"
                deadline = time.monotonic() + 20
                while ready not in nb_log.read_text(errors="replace"):
                    if nb.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{name} did not start: {nb_log.read_text()[-800:]}")
                    time.sleep(0.02)
            nb0 = cpu_seconds(nb.pid) if nb else 0.0
            w0 = time.perf_counter()
            hot, closes, flush, worst = harness.feed(c, data, clock, t0, 50_000, 20_000)
            cpu = hot + closes + flush
            wall = time.perf_counter() - w0
            nb_cpu = (cpu_seconds(nb.pid) - nb0) if nb else None
        finally:
            if nb is not None:
                nb.terminate()
                nb.wait(30)
            c.server_close()
            shutil.rmtree(d, ignore_errors=True)
        r = dict(cpu=1e6 * cpu / n, flush=1e6 * flush / n, worst=1e3 * worst, wall=wall, nb=nb_cpu)
        results[name].append(r)
        every.append(r["cpu"])
        every_flush.append(r["flush"])
        print(
            f"  {name:13s} {r['cpu']:.3f} us CPU/datagram (flushes {r['flush']:.3f}), longest flush "
            f"{r['worst']:.1f} ms, {n / wall:,.0f} datagrams/s of wall time"
            + (f", neighbour {100 * nb_cpu / wall:.1f} % of a core" if nb_cpu is not None else ""),
            flush=True,
        )
    print()
    ratios, flush_ratios = bracket_ratios(seq, every), bracket_ratios(seq, every_flush)
    print(
        f"in-process collector, medians (ratio: the {names[0]} runs on either side over the neighbour's, "
        "CPU per datagram, median over the neighbour's runs):"
    )
    for name in names:
        rs = results[name]
        cpu, fl = median([r["cpu"] for r in rs]), median([r["flush"] for r in rs])
        runs = ", ".join(f"{r['cpu']:.3f}" for r in rs)
        print(
            f"  {name:13s} {cpu:.3f} us CPU/datagram ("
            + (
                f"ratio {median(ratios[name]):.3f}, {min(ratios[name]):.3f}-{max(ratios[name]):.3f}; "
                if name in ratios
                else ""
            )
            + f"runs {runs}); flushes {fl:.3f} us"
            + (f" (ratio {median(flush_ratios[name]):.3f})" if name in flush_ratios else "")
            + f"; longest flush median {median([r['worst'] for r in rs]):.1f} ms"
        )


def report_ingest(ingest: dict, fwd: float | None, central_rate: float | None, gateways: int) -> None:
    n = ingest["n_readings"]
    best = ingest["best"]
    med = {}
    for label in ("alone", "beside"):
        bs = best[label]
        if not bs:
            print(f"collector zero-loss ingest {label}: no passing step")
            continue
        rates = [b["rate"] * n for b in bs]
        achieved = [b["stored_readings"] / b["send_elapsed"] for b in bs]
        capped = sum(1 for b in bs if b.get("sender_capped"))
        med[label] = median(rates)
        print(
            f"collector zero-loss ingest, {label + (' (the uplink following it)' if label == 'beside' else '')}: "
            f"min / median / max {spread(rates)} readings/s offered over {len(bs)} searches "
            f"({', '.join(f'{x:,.0f}' for x in rates)}; sender achieved {', '.join(f'{x:,.0f}' for x in achieved)})"
            + (f"; {capped} at the sender's ceiling" if capped else "")
            + "; lost at "
            + ", ".join(f"{b['lost_at'] * n:,.0f}" if b.get("lost_at") else "-" for b in bs)
        )
    if len(med) == 2:
        print(
            f"ingest with / without the uplink, medians = {med['beside'] / med['alone']:.2f} (target >= 0.95; "
            "each search resolves the gap between its best pass and its lowest loss above it)"
        )
        if fwd:
            print(
                f"uplink forward / collector ingest = {fwd / med['alone']:.1f} (target >= 1); "
                f"central consumer / ({gateways} x ingest) = {central_rate / (gateways * med['alone']):.2f} "
                "(target >= 1)"
            )
    pairs = ingest["pairs"]
    if pairs["alone"] and pairs["beside"]:
        cpu = {k: median([r["cpu_us_per_datagram"] for r in v]) for k, v in pairs.items()}
        lost = {k: sum(r["sent"] - r["stored"] for r in v) for k, v in pairs.items()}
        print(
            f"collector CPU per datagram at {ingest['pair_rate']:,.0f} datagrams/s, medians of "
            f"{len(pairs['alone'])} pairs: alone {cpu['alone']:.2f} us, beside the uplink {cpu['beside']:.2f} us: "
            f"datagrams per CPU-second beside / alone = {cpu['alone'] / cpu['beside']:.2f} (the collector's speed "
            f"on its own core, whatever else ran there); datagrams lost alone {lost['alone']}, beside {lost['beside']}"
        )
    every_of = {k: ingest["steps"][k] + pairs[k] for k in ("alone", "beside")}
    if every_of["alone"] and every_of["beside"]:
        # A flush commits a few hundred frames at most: a WAL past 1,500 frames was not started
        # again after its checkpoint at 1,000 (Sampler).
        peak = {k: max(r["wal_frames_peak"] for r in v) for k, v in every_of.items()}
        over = {k: sum(1 for r in v if r["wal_frames_peak"] > 1500) for k, v in every_of.items()}
        size = {k: max(r["wal_peak"] for r in v) for k, v in every_of.items()}
        mean = ""
        if pairs["alone"] and pairs["beside"]:
            m = {k: median([r["wal_frames_mean"] for r in v]) for k, v in pairs.items()}
            mean = f"; frames in use, time-averaged, medians of the pairs: alone {m['alone']:.0f}, beside {m['beside']:.0f}"
        print(
            f"collector WAL over all steps: at most {peak['alone']:,} frames in use alone, {peak['beside']:,} beside "
            f"(-wal file at most {size['alone'] / 2**20:.1f} / {size['beside'] / 2**20:.1f} MiB); steps whose WAL "
            f"went past 1,500 frames (a checkpoint held back by a reader): alone {over['alone']} of "
            f"{len(every_of['alone'])}, beside {over['beside']} of {len(every_of['beside'])}" + mean
        )
        top = {k: max(r["sent"] / r["send_elapsed"] for r in v) for k, v in every_of.items()}
        print(
            f"the sender (on core 1 with the uplink and nats-server) reached {top['beside']:,.0f} datagrams/s beside "
            f"the uplink, {top['alone']:,.0f} without"
            + (
                ": above every zero-loss rate found, so the collector, not the sender, set them"
                if best["alone"]
                and best["beside"]
                and min(top.values()) > max(b["rate"] for b in best["alone"] + best["beside"])
                else ""
            )
        )
    beside_steps = ingest["steps"]["beside"] + pairs["beside"]
    if beside_steps:
        up = sorted(r["uplink_cpu_share"] for r in beside_steps)
        br = sorted(r["broker_cpu_share"] for r in beside_steps)
        print(
            f"uplink CPU while following the collector: median {100 * median(up):.1f} % of a core (max "
            f"{100 * up[-1]:.1f} %) over {len(up)} steps; the local nats-server: median {100 * median(br):.1f} % "
            "(on a gateway the broker is elsewhere)"
        )
        behind = [r for r in beside_steps if r.get("uplink_behind")]
        for r in behind:
            print(f"  UPLINK BEHIND at the end of a step at {r['rate']:,.0f}/s: {r['uplink_behind']} entries")
        every = ingest["steps"]["alone"] + ingest["steps"]["beside"] + pairs["alone"] + pairs["beside"]
        refused = sum(r["refused_flushes"] for r in every)
        print(f"flushes the database refused (SQLITE_BUSY and the like) over all {len(every)} steps: {refused}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="outage length of the catch-up backlog (one gateway)")
    p.add_argument(
        "--distinct-minutes",
        type=float,
        default=2.0,
        help="minutes of the catch-up backlog generated; the rest repeats their rows under new ids",
    )
    p.add_argument("--rate", type=int, default=10_000, help="ingest readings/s during the outage")
    p.add_argument("--sensors", type=int, default=2000, help="sensors of each gateway (2 readings a datagram)")
    p.add_argument("--gateways", type=int, default=3, help="gateways feeding the central consumer")
    p.add_argument(
        "--central-minutes",
        type=float,
        default=7.0,
        help="backlog of each gateway for the central phase (7: at the default rate every sensor fills a "
        "1,024-datagram chunk, so the consumer's chunk closing is in the figure; a shorter backlog leaves "
        "most datagrams in open heads, not yet encoded)",
    )
    p.add_argument(
        "--central-baseline",
        action="store_true",
        help="also drain the same backlogs sent as payload 2 (the central side keeps a row per datagram) for the ratio",
    )
    p.add_argument(
        "--central-only",
        action="store_true",
        help="only phase 2 (the central consumer; implies --skip-ingest): ~2-3 minutes with --central-alone",
    )
    p.add_argument(
        "--central-timeline",
        action="store_true",
        help="print each consumer's CPU share over time (writer / workers / broker, per second) and when it stored "
        "its first readings",
    )
    p.add_argument(
        "--central-alone",
        action="store_true",
        help="also drain the central backlogs with the consumer in one process (--close-workers 0): the ratio",
    )
    p.add_argument(
        "--central-against",
        metavar="BIN",
        help="also drain the central backlogs with the telemetry-uplink of another checkout's virtualenv "
        "(e.g. /path/to/main/.venv/bin), in turn with this one's: before/after in one run",
    )
    p.add_argument("--central-workers", type=int, help="the consumer's --close-workers (default: its own)")
    p.add_argument("--head-budget", type=float, help="the consumer's --head-budget (MiB; default: its own, 48)")
    p.add_argument("--central-runs", type=int, default=1, help="consumer runs of each kind (in turn)")
    p.add_argument("--skip-ingest", action="store_true", help="do not measure the collector's ingest rate")
    p.add_argument(
        "--ingest-only",
        action="store_true",
        help="only phase 3: ingest alone and beside the uplink (~5 minutes at load 4-6)",
    )
    p.add_argument("--ingest-seconds", type=float, default=2.0, help="length of each ingest step")
    p.add_argument("--ingest-start", type=float, default=25_000, help="datagrams/s of each search's first step")
    p.add_argument(
        "--bisect-steps", type=int, default=6, help="bisection steps of each zero-loss search at most (bench/ingest.py)"
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=0.025,
        help="bisect until the lowest loss is within this fraction of the best pass (bench/ingest.py; 0.025: 2.5 %%)",
    )
    p.add_argument("--searches", type=int, default=3, help="zero-loss searches of each (alone, beside), in turn")
    p.add_argument("--pairs", type=int, default=3, help="fixed-rate pairs (alone, beside) for CPU per datagram")
    p.add_argument("--pair-seconds", type=float, default=10.0, help="length of each pair's steps")
    p.add_argument("--ingest-sensors", type=int, default=100, help="sensors of the ingest steps (bench/ingest.py: 100)")
    p.add_argument(
        "--disturbed",
        type=float,
        default=0.25,
        help="a lossy step whose collector waited this share of its send for its core is taken again (--retakes)",
    )
    p.add_argument("--retakes", type=int, default=1, help="times a disturbed lossy step is taken again at most")
    p.add_argument("--pair-rate", type=float, help="datagrams/s of the pairs (default: half the alone median)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="the uplink's poll interval beside the collector")
    p.add_argument(
        "--uplink-nice",
        type=int,
        default=UNIT_NICE,
        help=f"niceness of the uplink beside the collector (default {UNIT_NICE}: Nice= of "
        "deploy/systemd/telemetry-uplink.service, as deployed; 0: as sessions 1-4 measured it)",
    )
    p.add_argument(
        "--neighbours",
        type=lambda v: [n for n in v.split(",") if n],
        help=f"only: fixed-rate steps of the collector beside each of these on core 1, in turn "
        f"(of {', '.join(NEIGHBOURS)}; the first is the baseline), --pairs rounds",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="with --neighbours: the collector's work in this process (no sockets, no sender), its CPU time",
    )
    p.add_argument("--core-datagrams", type=int, default=1_000_000, help="datagrams of each --in-process run")
    p.add_argument(
        "--fixed",
        type=lambda v: [float(x) for x in v.split(",") if x],
        help="only: steps at these datagrams/s (near the zero-loss edge), alone and beside each of --fixed-with "
        "in turn, --rounds rounds (--ingest-seconds a step): lossy steps and datagrams lost, min/median/max",
    )
    p.add_argument(
        "--fixed-with",
        type=lambda v: [n for n in v.split(",") if n],
        default=["alone", "uplink"],
        help="with --fixed: the conditions (of the --neighbours names; the first is the baseline)",
    )
    p.add_argument("--rounds", type=int, default=6, help="with --fixed: steps of each rate and condition")
    p.add_argument(
        "--placement",
        choices=("pinned", "gateway"),
        default="pinned",
        help="pinned: the collector alone on core 0, the uplink with the sender and nats-server on core 1; "
        "gateway: the collector and the uplink unpinned, as systemd runs them on a 2-core gateway "
        "(the sender, standing for the network, and nats-server on core 1)",
    )
    p.add_argument(
        "--uplink-policy",
        choices=("other", "batch", "idle"),
        default=UNIT_POLICY,
        help=f"scheduling policy of the uplink beside the collector (default {UNIT_POLICY}: CPUSchedulingPolicy= "
        "of deploy/systemd/telemetry-uplink.service, as deployed)",
    )
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--_reader", help=argparse.SUPPRESS)
    p.add_argument("--_durable", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._reader:
        reader_loop(args._reader, args.poll_interval, args._durable)
        return
    for n in (args.neighbours or []) + (args.fixed_with if args.fixed else []):
        if n not in NEIGHBOURS:
            p.error(f"--neighbours/--fixed-with: {n!r} is none of {', '.join(NEIGHBOURS)}")
    if args.central_only:
        args.skip_ingest = True
    hour = 10_000 * 3600
    load0 = os.getloadavg()[0]
    r = b = c_pub = None
    fwd = v1 = central_rate = central2_rate = readings = None
    with tempfile.TemporaryDirectory() as wd:
        workdir = Path(wd)
        nats, url = start_nats(workdir)
        try:
            if args.neighbours and args.in_process:
                core_phase(url, nats.pid, args, workdir)
                return
            if args.neighbours:
                neighbours_phase(url, nats.pid, args, workdir)
                return
            if args.fixed:
                fixed_phase(url, nats.pid, args, workdir)
                return
            if not args.ingest_only:
                (r, fwd, readings, b, v1, c_pub, central_rate, central2_rate) = backlog_phases(
                    args, url, workdir, nats.pid
                )
            ingest = None if args.skip_ingest else ingest_beside(url, nats.pid, args, workdir)
        finally:
            nats.terminate()
            nats.wait(30)
    print()
    if not args.ingest_only and not args.central_only:
        print(
            f"uplink forward rate (payload 3, catch-up of {readings:,} readings): {fwd:,.0f} readings/s; "
            f"payload 1 in the same run: {v1:,.0f} readings/s (ratio {fwd / v1:.1f})"
        )
        if readings >= hour:
            print(
                f"catch-up after 1 h at 10,000 readings/s: measured {r['elapsed'] * hour / readings:.0f} s "
                "(target < 120 s)"
            )
        else:
            print(
                f"catch-up after 1 h at 10,000 readings/s ({hour:,} readings), extrapolated from "
                f"{readings:,}: {hour / fwd:.0f} s (target < 120 s)"
            )
        print(
            f"uplink peak RSS: {max(r['peak_rss_kb'], c_pub['peak_rss_kb']) / 1024:.1f} MB (target < 60 MB); "
            f"payload 1: {b['peak_rss_kb'] / 1024:.1f} MB"
        )
    if not args.ingest_only:
        print(
            f"central consumer: {central_rate:,.0f} readings/s with payload 3"
            + (
                f"; {central2_rate:,.0f} with payload 2 (ratio {central_rate / central2_rate:.2f})"
                if central2_rate
                else " (--central-baseline: payload 2 beside it)"
            )
        )
    if ingest:
        report_ingest(ingest, fwd, central_rate, args.gateways)
    print(
        f"(machine: {os.cpu_count()} cores, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: "
        "shared, figures are indicative)"
    )


def backlog_phases(args, url: str, workdir: Path, broker_pid: int | None = None):
    """Phases 1 and 2: catch-up (payload 3 and the payload-1 baseline) and the central consumer
    (payload 3, and payload 2 for comparison)."""
    shape = (
        f"{args.sensors} sensors, {args.rate / (2 * args.sensors):g} datagrams/s each of 2 readings, "
        "one ingest_log row per second"
    )
    if args.central_only:
        r, fwd, readings, b, v1 = None, None, None, None, None
    else:
        r, fwd, readings, b, v1 = catchup_phase(args, url, workdir, shape)
    c_pub, central_rate, central2_rate = central_phase(args, url, workdir, broker_pid)
    return r, fwd, readings, b, v1, c_pub, central_rate, central2_rate


def catchup_phase(args, url: str, workdir: Path, shape: str):
    # 1. catch-up: one gateway's backlog drained by payload 3 (and a payload-1 baseline on a
    # short backlog of the same shape, same run)
    print(f"catch-up backlog: {args.minutes:g} min at {args.rate:,} readings/s; {shape}", flush=True)
    big = str(workdir / "catchup.db")
    t = time.monotonic()
    entries, readings = fill(big, args.minutes, args.rate, args.sensors, 0, args.distinct_minutes)
    print(
        f"  filled {readings:,} readings in {entries} rows ({os.path.getsize(big) / 1e6:.0f} MB; "
        f"{args.distinct_minutes:g} min distinct, the rest repeated) in {time.monotonic() - t:.1f} s",
        flush=True,
    )
    r = drain({"catchup": big}, url, entries, workdir, args.timeout, stream="CATCHUP")
    fwd = readings / r["elapsed"]
    print(
        f"  payload 3: drained in {r['elapsed']:.2f} s = {fwd:,.0f} readings/s, {r['messages']:,} messages; "
        f"uplink peak RSS {r['peak_rss_kb'] / 1024:.1f} MB",
        flush=True,
    )
    os.unlink(big)
    small = str(workdir / "small.db")
    s_entries, s_readings = fill(small, 2.0, args.rate, args.sensors, 1)
    base = str(workdir / "baseline.db")
    copy_db(small, base)
    b = drain({"baseline": base}, url, s_entries, workdir, args.timeout, payload=1, stream="CATCHUP")
    v1 = s_readings / b["elapsed"]
    print(
        f"  payload 1 baseline (2 min, {s_readings:,} readings): {b['elapsed']:.2f} s = "
        f"{v1:,.0f} readings/s, {b['messages']:,} messages; peak RSS {b['peak_rss_kb'] / 1024:.1f} MB",
        flush=True,
    )
    return r, fwd, readings, b, v1


def central_phase(args, url: str, workdir: Path, broker_pid: int | None = None):
    # 2. central: the gateways' backlogs published at once (payload 3), then one consumer
    # drains them all; and the same backlogs as payload 2 (each datagram's identity kept
    # centrally, as before payload 3) to a stream of their own, drained the same way
    # (--central-minutes: 7 by default, so every sensor closes a chunk of the usual 1,024 datagrams)
    gw_db = str(workdir / "gateway.db")
    c_entries, c_readings = fill(gw_db, args.central_minutes, args.rate, args.sensors, 2)
    print(
        f"central backlog: {args.central_minutes:g} min of each of {args.gateways} gateways "
        f"({c_readings:,} readings each, distinct)",
        flush=True,
    )
    dbs = {}
    for g in range(args.gateways):
        dbs[f"site-{g}"] = str(workdir / f"gw{g}.db")
        copy_db(gw_db, dbs[f"site-{g}"])
    c_pub = drain(dbs, url, c_entries, workdir, args.timeout, payload=3)
    if args.central_baseline:
        dbs2 = {}
        for g in range(args.gateways):
            dbs2[f"site-{g}"] = str(workdir / f"gw{g}-p2.db")
            copy_db(gw_db, dbs2[f"site-{g}"])
        drain(dbs2, url, c_entries, workdir, args.timeout, payload=2, stream="CENTRAL2")
    total = c_readings * args.gateways
    print(
        f"  {args.gateways} uplinks at once: {total:,} readings in {c_pub['elapsed']:.2f} s = "
        f"{total / c_pub['elapsed']:,.0f} readings/s together",
        flush=True,
    )
    rates: dict[str, list[float]] = {"workers": [], "alone": [], "against": []}
    kinds = [("workers", args.central_workers, BIN), ("alone", 0, BIN)]
    if args.central_against:
        kinds.insert(1, ("against", args.central_workers, Path(args.central_against)))
    for run in range(args.central_runs):
        # the consumer as deployed (close workers: one per core beyond the writer's), another
        # checkout's (--central-against), then in one process (--close-workers 0), each draining
        # the same stream with a durable of its own; the order turns each run
        for label, workers, bin_dir in kinds if run % 2 == 0 else kinds[::-1]:
            if label == "alone" and not args.central_alone:
                continue
            c = consume(
                url,
                total,
                workdir,
                args.timeout,
                close_workers=workers,
                tag=f"-{label}{run}",
                head_budget=args.head_budget,
                bin_dir=bin_dir,
                broker_pid=broker_pid,
            )
            rate = c["stored"] / c["elapsed"]
            rates[label].append(rate)
            cpu = c["cpu"] + c["worker_cpu"]
            who = "" if label != "against" else f", {bin_dir}"
            print(
                f"  central consumer (payload 3, {c['workers']} close worker(s){who}): {c['stored']:,} readings of "
                f"{args.gateways} gateways in {c['elapsed']:.2f} s = {rate:,.0f} readings/s "
                f"({rate / TARGET_CENTRAL:.2f} of the {TARGET_CENTRAL / 1e6:.2f} M target, {rate / SESSION4_CENTRAL:.2f}x "
                f"session 4's {SESSION4_CENTRAL:,}); {c['stored'] / cpu:,.0f} per CPU second (writer "
                f"{c['cpu']:.1f} s + workers {c['worker_cpu']:.1f} s); peak RSS writer {c['peak_rss_kb'] / 1024:.1f} MB"
                + (f", each worker <= {c['worker_rss_kb'] / 1024:.1f} MB" if c["workers"] else "")
                + f"; central database {c['db_bytes'] / 1e6:.0f} MB",
                flush=True,
            )
            if args.central_timeline:
                print("    " + timeline_line(c["timeline"]), flush=True)
    central_rate = statistics.median(rates["workers"])
    for key, this, that in (
        ("against", "this checkout", "the other's"),
        ("alone", "with close workers", "in one process"),
    ):
        if rates[key]:
            other = statistics.median(rates[key])
            print(
                f"  medians: {central_rate:,.0f} readings/s {this}, {other:,.0f} {that} "
                f"(ratio {central_rate / other:.2f})",
                flush=True,
            )
    central2_rate = None
    if args.central_baseline:
        c2 = consume(url, total, workdir, args.timeout, stream="CENTRAL2")
        central2_rate = c2["stored"] / c2["elapsed"]
        print(
            f"  central consumer (payload 2, same backlogs): {c2['elapsed']:.2f} s = {central2_rate:,.0f} "
            f"readings/s ({c2['stored'] / c2['cpu']:,.0f} per CPU second); peak RSS "
            f"{c2['peak_rss_kb'] / 1024:.1f} MB; central database "
            f"{c2['db_bytes'] / 1e6:.0f} MB (payload 3 / payload 2 = "
            f"{central_rate / central2_rate:.2f})",
            flush=True,
        )
    return c_pub, central_rate, central2_rate


if __name__ == "__main__":
    main()
