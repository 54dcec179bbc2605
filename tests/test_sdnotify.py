"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket

import pytest

from collector.sdnotify import Notifier


@pytest.fixture
def systemd_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def test_without_notify_socket_everything_is_a_no_op():
    notify = Notifier({})
    assert not notify.enabled
    assert notify("READY=1") is False


def test_ready_and_stopping_reach_the_socket(systemd_socket):
    path, sock = systemd_socket
    notify = Notifier({"NOTIFY_SOCKET": path})
    assert notify("READY=1") is True
    assert sock.recv(256) == b"READY=1"
    assert notify("STOPPING=1") is True
    assert sock.recv(256) == b"STOPPING=1"
    notify.close()


def test_abstract_socket_name():
    name = f"gateway-telemetry-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notify = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notify("READY=1")
        assert sock.recv(256) == b"READY=1"
        notify.close()
    finally:
        sock.close()


def test_watchdog_is_rate_limited_to_half_the_interval(systemd_socket):
    path, sock = systemd_socket
    notify = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())})
    assert notify.watchdog_interval == 60.0
    assert notify("WATCHDOG=1") is True
    assert notify("WATCHDOG=1") is False  # within 30 s of the last ping
    assert sock.recv(256) == b"WATCHDOG=1"
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(256)
    notify.close()


def test_watchdog_for_another_pid_is_ignored(systemd_socket):
    path, _ = systemd_socket
    notify = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notify.watchdog_interval is None
    assert notify("WATCHDOG=1") is False


def test_vanished_systemd_is_not_an_error(tmp_path):
    notify = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notify("READY=1") is False
    notify.close()
