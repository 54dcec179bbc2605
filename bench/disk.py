"""Disk benchmark: bytes per reading of our chunks against InfluxDB 1.6's TSM, same data, same run.

The workload is bench/workload.py's realistic day (20 sensors x 5 metrics at
1 Hz for 24 h = 8.64 M readings by default).  For each chunk size asked
(default 1024, 256 and 128 datagrams) every sensor's day is cut into chunks
and encoded with collector/chunkenc.py; the figures are the chunk blobs'
bytes per reading (seq, sensor time and receive time included, which InfluxDB
below does not even store), per metric kind (a metric's share: the chunk
with it minus the chunk without any metric) and overall.  Beside them, the
baseline a store would use without a codec, zlib(msgpack(columns)), and the
median time to decode a chunk, as a ratio to decoding that baseline.

Then the same values go to InfluxDB 1.6 (Debian package `influxdb`): influxd
is started from here with a temporary config (loopback, free ports, its own
directories), the day is written as line protocol over HTTP (`sensor` a tag,
the five metrics as fields, counter an integer, ms timestamps: the very
floats and ints the chunks hold), the shard is left cold until influxd has
fully compacted it (cache-snapshot-write-cold-duration and
compact-full-write-cold-duration shortened to seconds; we wait for the WAL to
empty and one TSM generation to remain), and its TSM bytes per value are
the comparison.  --influx-extra also writes seq and receive time as fields,
like for like with what a chunk holds.

    .venv/bin/python bench/disk.py                       # the whole day, ~5-10 minutes
    .venv/bin/python bench/disk.py --seconds 3600        # one hour, quicker
    .venv/bin/python bench/disk.py --skip-influx --chunk-sizes 1024

Fails with a clear message if influxd is missing (apt-get install influxdb).
Every phase is bounded in time (--timeout).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import Workload  # noqa: E402
from collector.chunkenc import decode_chunk, encode_chunk  # noqa: E402

INFLUX_BATCH_LINES = 5000


class BenchError(Exception):
    """A phase failed or ran out of time; the message says which."""


def chunks_of(columns, size):
    seqs, ts, received, metrics = columns
    for i in range(0, len(seqs), size):
        sl = slice(i, i + size)
        yield seqs[sl], ts[sl], received[sl], {name: col[sl] for name, col in metrics.items()}


def baseline_blob(chunk) -> bytes:
    """What a store without a codec would keep: zlib(msgpack(columns)), as the ingest log does."""
    seqs, ts, received, metrics = chunk
    return zlib.compress(msgpack.packb([seqs, ts, received, metrics]), 9)


def median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e6


def codec_figures(w: Workload, configs: list[tuple[int, bool, bool]], deadline: float) -> list[dict]:
    """Bytes of every chunk of the day for each (chunk size, fast, attribute) config.

    The workload is generated once per sensor and cut for every config.
    attribute adds each metric's share: the chunk with it minus the chunk
    without any metric.
    """
    acc = [
        {
            "total": 0,
            "base": 0,
            "shared": 0,
            "datagrams": 0,
            "chunks": 0,
            "encode_s": 0.0,
            "per_metric": dict.fromkeys(w.metrics, 0),
            "sample": None,
        }
        for _ in configs
    ]
    for sensor in w.sensor_ids():
        columns = w.columns(sensor)
        for (size, fast, attribute), a in zip(configs, acc):
            for chunk in chunks_of(columns, size):
                if time.monotonic() > deadline:
                    raise BenchError(f"chunk size {size}: out of time (--timeout)")
                start = time.process_time()
                blob = encode_chunk(*chunk, fast=fast)
                a["encode_s"] += time.process_time() - start
                if decode_chunk(blob) != chunk:  # == is enough here: the tests check bit-exactness
                    raise BenchError(f"chunk of {sensor} did not round-trip")
                a["total"] += len(blob)
                a["base"] += len(baseline_blob(chunk))
                a["datagrams"] += len(chunk[0])
                a["chunks"] += 1
                if attribute:
                    seqs, ts, received, metrics = chunk
                    without = len(encode_chunk(seqs, ts, received, {}, fast=fast))
                    a["shared"] += without
                    for name, col in metrics.items():
                        a["per_metric"][name] += len(encode_chunk(seqs, ts, received, {name: col}, fast=fast)) - without
                if a["sample"] is None and len(chunk[0]) == size:
                    a["sample"] = chunk
    results = []
    for (size, fast, attribute), a in zip(configs, acc):
        datagrams = a["datagrams"]
        readings = datagrams * len(w.metrics)
        out = {
            "size": size,
            "fast": fast,
            "chunks": a["chunks"],
            "datagrams": datagrams,
            "readings": readings,
            "bytes": a["total"],
            "per_reading": a["total"] / readings,
            "baseline_per_reading": a["base"] / readings,
            "encode_us_per_datagram": a["encode_s"] / datagrams * 1e6,
        }
        if attribute:
            out["shared_per_datagram"] = a["shared"] / datagrams
            out["per_metric"] = {name: b / datagrams for name, b in a["per_metric"].items()}
        sample = a["sample"]
        if sample is not None:
            blob, base = encode_chunk(*sample, fast=fast), baseline_blob(sample)
            out["decode_us"] = median_us(lambda: decode_chunk(blob), 200)
            out["baseline_decode_us"] = median_us(
                lambda: msgpack.unpackb(zlib.decompress(base), strict_map_key=False), 200
            )
        results.append(out)
    return results


# ------------------------------------------------------------------ InfluxDB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


INFLUX_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{dir}/meta"
[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  index-version = "inmem"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "2s"
  compact-full-write-cold-duration = "5s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http}"
  log-enabled = false
[ifql]
  enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""


class Influx:
    """influxd on loopback with a throwaway config and data directory."""

    def __init__(self, workdir: Path, timeout: float) -> None:
        self.dir = workdir
        self.http_port = free_port()
        conf = workdir / "influxdb.conf"
        conf.write_text(INFLUX_CONFIG.format(dir=workdir, rpc=free_port(), http=self.http_port))
        self.log = open(workdir / "influxd.log", "wb")
        self.proc = subprocess.Popen(
            ["influxd", "run", "-config", str(conf)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"influxd exited ({self.proc.returncode}); see {workdir}/influxd.log")
            try:
                if self.request("GET", "/ping")[0] == 204:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("influxd did not answer /ping in time")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def query(self, q: str) -> bytes:
        from urllib.parse import quote

        status, body = self.request("POST", "/query?q=" + quote(q))
        if status != 200:
            raise BenchError(f"influx query {q!r}: HTTP {status} {body[:200]!r}")
        return body

    def write(self, db: str, lines: list[str]) -> None:
        status, body = self.request("POST", f"/write?db={db}&precision=ms", "\n".join(lines).encode())
        if status != 204:
            raise BenchError(f"influx write: HTTP {status} {body[:200]!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def line(measurement: str, sensor: str, ts_ms: int, fields: dict) -> str:
    parts = []
    for name, v in fields.items():
        parts.append(f"{name}={v}i" if type(v) is int else f"{name}={v!r}")
    return f"{measurement},sensor={sensor} {','.join(parts)} {ts_ms}"


def shard_files(data_dir: Path, db: str) -> tuple[int, int, int]:
    """(TSM bytes, TSM files, all shard bytes) of one database."""
    tsm = files = everything = 0
    for path in (data_dir / db).rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            everything += size
            if path.suffix == ".tsm":
                tsm += size
                files += 1
    return tsm, files, everything


def wal_bytes(wal_dir: Path, db: str) -> int:
    return sum(p.stat().st_size for p in (wal_dir / db).rglob("*.wal") if p.is_file())


def influx_figures(w: Workload, dbs: dict[str, bool], timeout: float) -> dict:
    """Write the day to influxd, wait for full compaction, return TSM bytes per value per database."""
    if shutil.which("influxd") is None:
        raise BenchError("influxd is not installed: apt-get install influxdb (InfluxDB 1.6, Debian package)")
    workdir = Path(tempfile.mkdtemp(prefix="disk-bench-influx-"))
    influx = None
    try:
        influx = Influx(workdir, 30)
        deadline = time.monotonic() + timeout
        out = {}
        for db in dbs:
            influx.query(f"CREATE DATABASE {db}")
        start = time.monotonic()
        values = dict.fromkeys(dbs, 0)
        for sensor in w.sensor_ids():
            batches = {db: [] for db in dbs}
            for row in w.rows(sensor):
                ts_ms = round(row.ts * 1000)
                if ts_ms / 1000 != row.ts:
                    raise BenchError(f"ts {row.ts!r} is not a whole ms: InfluxDB could not hold it exactly")
                for db, extra in dbs.items():
                    fields = dict(row.readings)
                    if extra:
                        fields["seq"] = row.seq
                        fields["received"] = row.received
                    batches[db].append(line("m", sensor, ts_ms, fields))
                    values[db] += len(fields)
                    if len(batches[db]) >= INFLUX_BATCH_LINES:
                        influx.write(db, batches[db])
                        batches[db] = []
                if time.monotonic() > deadline:
                    raise BenchError("influx: out of time while writing (--timeout)")
            for db, batch in batches.items():
                if batch:
                    influx.write(db, batch)
        write_s = time.monotonic() - start
        # Check nothing was refused or lost before measuring.
        for db in dbs:
            body = influx.query(f'SELECT count("temp") FROM "{db}".."m"')
            want = w.sensors * w.datagrams_per_sensor
            if f",{want}]".encode() not in body:
                raise BenchError(f"influx {db}: count(temp) is not {want}: {body[:300]!r}")
        # Wait until the shard is cold and fully compacted: the WAL empty and
        # one TSM generation left, stable for a few seconds.
        data_dir, wal_dir = workdir / "data", workdir / "wal"
        stable_since, last = None, None
        while True:
            state = {db: (shard_files(data_dir, db), wal_bytes(wal_dir, db)) for db in dbs}
            done = all(files == 1 and wal == 0 for (_, files, _), wal in state.values())
            if state != last:
                stable_since, last = time.monotonic(), state
            if done and time.monotonic() - stable_since > 10:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"influx: not fully compacted in time (--timeout): {state}")
            time.sleep(1)
        for db in dbs:
            tsm, files, everything = shard_files(data_dir, db)
            out[db] = {
                "values": values[db],
                "tsm_bytes": tsm,
                "tsm_files": files,
                "shard_bytes": everything,
                "per_value": tsm / values[db],
            }
        out["write_s"] = write_s
        return out
    finally:
        if influx is not None:
            influx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Bytes per reading of our chunks against InfluxDB 1.6 on the same realistic day.",
        epilog="Example: .venv/bin/python bench/disk.py --seconds 3600 --chunk-sizes 1024,128",
    )
    p.add_argument("--sensors", type=int, default=20)
    p.add_argument("--seconds", type=int, default=86_400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk-sizes", default="1024,256,128", help="datagrams per chunk, comma list")
    p.add_argument("--fast", action="store_true", help="also measure encode_chunk(fast=True) at the first size")
    p.add_argument("--skip-influx", action="store_true", help="our figures only (no ratio)")
    p.add_argument("--influx-extra", action="store_true", help="also an InfluxDB database with seq and received")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each phase may take (default 1800)")
    a = p.parse_args(argv)
    try:
        sizes = [int(x) for x in a.chunk_sizes.split(",")]
        if not sizes or min(sizes) < 1 or max(sizes) > 65_536:
            raise ValueError
    except ValueError:
        p.error("--chunk-sizes takes datagram counts 1-65536, e.g. 1024,128")
    if a.sensors < 1 or a.seconds < 1 or a.timeout <= 0:
        p.error("--sensors, --seconds and --timeout must be positive")
    if not a.skip_influx and shutil.which("influxd") is None:
        print(
            "disk.py: influxd is not installed: apt-get install influxdb (InfluxDB 1.6), "
            "or --skip-influx for our figures alone",
            file=sys.stderr,
        )
        return 2
    w = Workload(sensors=a.sensors, seconds=a.seconds, seed=a.seed)
    print(
        f"workload: {a.sensors} sensors x {len(w.metrics)} metrics at 1 Hz for {a.seconds} s = "
        f"{w.readings:,} readings (seed {a.seed}); machine: {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} (shared; timings are CPU-time medians)"
    )
    try:
        configs = [(size, False, i == 0) for i, size in enumerate(sizes)]
        if a.fast:
            configs.insert(1, (sizes[0], True, False))
        ours = codec_figures(w, configs, time.monotonic() + a.timeout)
        for r in ours:
            print(
                f"chunks of {r['size']:>5} datagrams{' (fast)' if r['fast'] else '':7}: "
                f"{r['per_reading']:.3f} B/reading ({r['bytes']:,} B in {r['chunks']} chunks); "
                f"zlib(msgpack) baseline {r['baseline_per_reading']:.3f} B/reading "
                f"(x{r['baseline_per_reading'] / r['per_reading']:.2f}); "
                f"encode {r['encode_us_per_datagram']:.1f} us/datagram"
            )
            if "decode_us" in r:
                print(
                    f"    decode one chunk: {r['decode_us']:.0f} us median "
                    f"(baseline zlib+msgpack {r['baseline_decode_us']:.0f} us, "
                    f"x{r['decode_us'] / r['baseline_decode_us']:.2f})"
                )
            if "per_metric" in r:
                print(
                    f"    shared seq+ts+received: {r['shared_per_datagram']:.3f} B/datagram "
                    f"({r['shared_per_datagram'] / len(w.metrics):.3f} B/reading)"
                )
                for name, b in r["per_metric"].items():
                    print(f"    {name:>9}: {b:.3f} B/reading (its column alone)")
        if a.skip_influx:
            return 0
        dbs = {"bench": False}
        if a.influx_extra:
            dbs["bench_all"] = True
        print(
            f"influxdb: writing {w.sensors * w.datagrams_per_sensor:,} lines per database ({', '.join(dbs)}) ...",
            flush=True,
        )
        inf = influx_figures(w, dbs, a.timeout)
        main_r = ours[0]
        for db, extra in dbs.items():
            r = inf[db]
            what = "5 metrics + seq + received" if extra else "5 metrics"
            print(
                f"influxdb 1.6 {db} ({what}): {r['per_value']:.3f} B/value "
                f"({r['tsm_bytes']:,} TSM bytes, {r['tsm_files']} file, {r['values']:,} values; "
                f"database dir with its preallocated series file {r['shard_bytes']:,} B)"
            )
        per_value = inf["bench"]["per_value"]
        print(f"influx write took {inf['write_s']:.0f} s")
        for r in ours:
            print(
                f"ratio, chunks of {r['size']}{' fast' if r['fast'] else ''}: ours {r['per_reading']:.3f} "
                f"B/reading (seq+ts+received included) vs influxdb {per_value:.3f} B/value "
                f"(5 metrics only): x{per_value / r['per_reading']:.2f} smaller"
            )
        if "bench_all" in inf:
            per_reading_all = inf["bench_all"]["tsm_bytes"] / main_r["readings"]
            print(
                f"like for like (influx also storing seq + received): influxdb {per_reading_all:.3f} "
                f"B/reading vs ours {main_r['per_reading']:.3f}: x{per_reading_all / main_r['per_reading']:.2f}"
            )
        return 0
    except BenchError as exc:
        print(f"disk.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
