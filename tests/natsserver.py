"""Real nats-server processes for the uplink tests: single servers and a three-node
JetStream cluster on loopback, each on ports the kernel picked, with its own store.

A machine without nats-server FAILS these tests with the command that installs
it (.ci/run does so when it is missing); they never skip."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

LISTENING = re.compile(rb"Listening for client connections on [^\s]*:(\d+)")


def require_nats_server() -> str:
    path = shutil.which("nats-server")
    if path is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server (.ci/run does this when missing)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server with JetStream; `conf` is extra configuration text."""

    def __init__(self, workdir: Path, name: str = "n1", conf: str = "", port: int = -1) -> None:
        self.binary = require_nats_server()
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.conf = conf
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        conf = self.dir / "server.conf"
        conf.write_text(
            f'server_name: "{self.name}"\nlisten: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n{self.conf}\n'
        )
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_bytes()[offset:]
            m = LISTENING.search(text)
            if m and (b"Server is ready" in text):
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited: {text.decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nats-server {self.name} not ready after {timeout}s: {text.decode(errors='replace')[-2000:]}"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9 (the store stays; start() again on the same port)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Cluster:
    """Three JetStream nodes routed on loopback (cluster ports picked free first)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        routes = ", ".join(f'"nats://127.0.0.1:{p}"' for p in ports)
        self.nodes = [
            NatsServer(
                workdir,
                f"n{i + 1}",
                conf=(f'cluster {{ name: "c1", listen: "127.0.0.1:{ports[i]}", routes: [{routes}] }}'),
            )
            for i in range(size)
        ]

    def __enter__(self) -> Cluster:
        try:
            procs = []
            for node in self.nodes:  # start all before waiting: they must find each other
                node.start()
                procs.append(node)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]


def wait_jetstream_ready(url: str, timeout: float = 20.0, replicas: int = 1) -> None:
    """Until the JetStream meta leader answers (a cluster needs a moment to elect one)."""
    import asyncio

    import nats

    async def probe() -> bool:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1, max_reconnect_attempts=1)
        except Exception:
            return False
        try:
            await nc.jetstream(timeout=1).account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while not asyncio.run(probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"JetStream at {url} not ready after {timeout}s")
        time.sleep(0.1)
