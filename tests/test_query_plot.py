"""telemetry-query plot and the sensors sparkline, checked as the user sees them: a real query server,
the real telemetry-query in a real terminal (tmux), its screen read back with capture-pane."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from query import commands, plot

import query_fixtures as fx
from helpers import wait_for
from query_fixtures import append_readings, fill_series, running_server

BLANK = "\u2800"  # an empty braille cell
T0 = fx.T0


class Terminal:
    """A tmux server of our own (socket under tmp_path), one window of a fixed size."""

    def __init__(self, tmp_path, columns: int = 100, lines: int = 30) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: apt-get install tmux (.ci/run installs it when missing)")
        self.sock = str(tmp_path / "tmux.sock")
        self.conf = tmp_path / "tmux.conf"
        # remain-on-exit keeps the screen (and the exit status) after the command ends.
        # COLUMNS/LINES from this process (pytest sets them) would override the pane's real size.
        self.conf.write_text(
            f"set -g remain-on-exit on\nset -g status off\nset -g default-size {columns}x{lines}\n"
            "set-environment -g -u COLUMNS\nset-environment -g -u LINES\n"
        )
        self.size = (columns, lines)
        self.status_file = tmp_path / "status"

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.sock, "-f", str(self.conf), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    def run(self, argv: list[str], env: dict[str, str]) -> None:
        """Start argv in the window; its exit status goes to a file (tmux may keep an exited pane
        looking alive for a while; the shell's `trap :` lets Ctrl-C reach only the command)."""
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.status_file.unlink(missing_ok=True)
        script = f"trap : INT; {subprocess.list2cmdline(argv)}; echo $? > {self.status_file}"
        self.tmux(
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            str(self.size[0]),
            "-y",
            str(self.size[1]),
            *env_args,
            subprocess.list2cmdline(["sh", "-c", script]),
        )

    def screen(self) -> list[str]:
        """What the user sees of the last frame: from the last title line on, scrollback included
        (tmux's own "Pane is dead" line takes two lines after the output, pushing its top line up)."""
        lines = [
            line
            for line in self.tmux("capture-pane", "-p", "-S", "-", "-t", "t").splitlines()
            if not line.startswith("Pane is dead")
        ]
        titles = [i for i, line in enumerate(lines) if " readings, " in line or line.startswith("Error")]
        lines = lines[titles[-1] :] if titles else lines
        while lines and not lines[-1].strip():
            lines.pop()
        return lines

    def wait_screen(self, predicate, timeout: float, what: str) -> list[str]:
        """Poll the screen until `predicate(screen)` holds, reading it once per poll (a frame
        being redrawn may be empty or half drawn); on timeout, say what was awaited and what
        the terminal showed last."""
        last: list[str] = []

        def ready() -> bool:
            nonlocal last
            last = self.screen()
            return bool(last) and predicate(last)

        try:
            wait_for(ready, timeout, 0.05, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the terminal showed:\n" + "\n".join(last)) from None
        return last

    def wait_exit(self, timeout: float, what: str) -> None:
        """Wait for the command's exit status; on timeout, say what was awaited and show the
        pane's last lines (scrollback included)."""
        try:
            wait_for(lambda: self.dead()[0], timeout, 0.05, what=what)
        except AssertionError as exc:
            pane = self.tmux("capture-pane", "-p", "-S", "-", "-t", "t").splitlines()[-8:]
            raise AssertionError(f"{exc}; the terminal showed:\n" + "\n".join(pane)) from None

    def dead(self) -> tuple[bool, str]:
        """(exited, its exit status as text)."""
        try:
            status = self.status_file.read_text().strip()
        except FileNotFoundError:
            return False, ""
        return status != "", status

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(tmp_path):
    term = Terminal(tmp_path)
    yield term
    term.close()


@pytest.fixture
def server(tmp_path, tls):
    """A step (0 for 75 s, then 10 for 75 s, one reading a second) and a zigzag (0, 10, 0, ... 4,000 readings)."""
    db = str(tmp_path / "plot.db")
    fill_series(db, "step", "v", 0)
    append_readings(db, "step", "v", [(T0 + i, i, 0.0 if i < 75 else 10.0) for i in range(150)])
    fill_series(db, "zigzag", "v", 0)
    append_readings(db, "zigzag", "v", [(T0 + i, i, 10.0 * (i % 2)) for i in range(4000)])
    with running_server(db, tls) as srv:
        yield {"db": db, "env": {"TELEMETRY_SERVER": f"localhost:{srv.server_address[1]}", "TELEMETRY_CA": tls.ca_pem}}


def canvas(screen: list[str]) -> list[str]:
    """The plot's canvas rows (right of the y axis' ' | '), top to bottom."""
    rows = [line.split(" | ", 1)[1] for line in screen if " | " in line and not line.startswith(" " * 11 + "|")]
    return [row for row in rows if row and all(c == BLANK or "\u2800" <= c <= "\u28ff" for c in row)]


def inked(row: str) -> list[int]:
    return [i for i, c in enumerate(row) if c != BLANK]


def test_a_plot_in_a_terminal_has_its_axes_labels_and_the_curve_where_the_data_is(server, terminal, bin_path):
    terminal.run([bin_path("telemetry-query"), "plot", "step", "--since", "0"], server["env"])
    terminal.wait_exit(60, "plot to draw and exit")
    assert terminal.dead() == (True, "0"), terminal.screen()
    screen = terminal.screen()
    # 150 readings, fewer than the 2 x 78 dot columns: drawn as they are, no buckets.
    assert screen[0] == "step v: 150 readings, 2023-11-14T22:13:20Z .. 2023-11-14T22:15:49Z"
    assert screen[1] == "   (v)     ^"
    assert any(line.rstrip().endswith("-> (UTC)") for line in screen)
    assert any(line.startswith(" " * 11 + "| 22:13:20") for line in screen), screen
    rows = canvas(screen)
    width, height = plot.canvas_size(100, 30)
    assert len(rows) == height and {len(r) for r in rows} == {width}, screen
    # The y axis runs 0 .. 10; the lowest canvas row is 0, the top one just under 10.
    assert screen[2] == "     10.10 |" and screen[-3].startswith("      0.00 | ")  # one dot row above 10
    # 0 for the first half: ink in the bottom row only left of the middle; 10 after: the top row
    # only right of it; the jump between is a vertical line in the middle.
    bottom, top = inked(rows[-1]), inked(rows[0])
    assert bottom and max(bottom) <= width // 2 + 1 and min(bottom) == 0, rows[-1]
    assert top and min(top) >= width // 2 - 1 and max(top) == width - 1, rows[0]
    middle = [inked(r) for r in rows]
    assert all(any(abs(i - width // 2) <= 1 for i in cells) for cells in middle), "\n".join(rows)


def test_a_downsampled_plot_draws_the_min_max_band(server, terminal, bin_path):
    terminal.run([bin_path("telemetry-query"), "plot", "zigzag", "--metric", "v", "--since", "0"], server["env"])
    terminal.wait_exit(60, "plot to draw and exit")
    assert terminal.dead() == (True, "0"), terminal.screen()
    screen = terminal.screen()
    width, height = plot.canvas_size(100, 30)
    bucket = plot.bucket_for(T0, T0 + 3999, 2 * width)
    # Too long for one line at 100 columns: the how on a line of its own.
    assert screen[0] == "zigzag v: 4000 readings, 2023-11-14T22:13:20Z .. 2023-11-14T23:19:59Z"
    assert screen[1] == f"average per {bucket:.3g} s, min/max band"
    assert bucket > 1  # so every bucket holds both a 0 and a 10
    # Every bucket spans 0 .. 10: the band inks every row, across the whole width.
    rows = canvas(screen)
    assert len(rows) == height - 1  # the second title line
    for row in rows:
        cells = inked(row)
        assert cells and cells[0] <= 1 and cells[-1] >= width - 2 and len(cells) >= width - 4, row


def test_watch_redraws_with_new_data_and_stops_on_ctrl_c_with_exit_0(server, terminal, bin_path):
    terminal.run([bin_path("telemetry-query"), "plot", "step", "--since", "0", "--watch", "0.2"], server["env"])
    terminal.wait_screen(lambda s: s[0].startswith("step v: 150 readings"), 60, "the first frame")
    append_readings(server["db"], "step", "v", [(T0 + 150 + i, 150 + i, 5.0) for i in range(50)])
    terminal.wait_screen(
        lambda s: s[0].startswith("step v: 200 readings") and s[-1].startswith("every 0.2 s, drawn "),
        60,
        "a whole frame with the new readings",
    )
    assert not terminal.dead()[0]
    terminal.tmux("send-keys", "-t", "t", "C-c")
    terminal.wait_exit(30, "plot --watch to stop on Ctrl-C")
    assert terminal.dead() == (True, "0")
    assert "Traceback" not in "\n".join(terminal.screen())


def test_plot_errors_are_one_line(server):
    env = server["env"]
    one = fx.run_cli(["plot", "stepp", "--since", "0"], env, code=1).stderr
    assert one == "Error: no sensor named 'stepp'; did you mean step?\n"
    one = fx.run_cli(["plot", "step", "--since", "1h"], env, code=1).stderr
    assert one.startswith("Error: no readings of step v from ") and one.endswith(": widen --since\n")
    assert "--since" in fx.run_cli(["plot", "step", "--since", "yesterday-ish"], env, code=2).stderr


def test_sparkline():
    assert plot.sparkline([]) == ""
    assert plot.sparkline([0, 0]) == "··"
    assert plot.sparkline([0, 1, 2, 4, 8]) == "·▁▂▄█"
    assert plot.sparkline([1, 1000]) == "▁█"
    assert plot.sparkline([3, 3, 3]) == "███"


def test_the_sensors_table_draws_each_sensors_last_hour(tmp_path, tls):
    db = str(tmp_path / "spark.db")
    now = 1_800_000_000.0 + 123  # 123 s into a 5-minute bucket
    current = math.floor(now / 300) * 300
    # busy: one reading a second in the 5 buckets before the current one, then silent;
    # quiet: 10 readings in the oldest bucket of the hour, 20 in the current one.
    fill_series(db, "busy", "temp", 1500, t0=current - 1500, step=1.0)
    fill_series(db, "quiet", "hum", 0)
    append_readings(
        db,
        "quiet",
        "hum",
        [(current - 3300 + i, i, 1.0) for i in range(10)] + [(current + i, 10 + i, 1.0) for i in range(20)],
    )
    with running_server(db, tls) as srv:
        session = commands._Session(
            {
                "server": f"localhost:{srv.server_address[1]}",
                "ca": tls.ca_pem,
                "cert": None,
                "key": None,
                "fmt": "table",
            }
        )
        try:
            rows = session.request("sensors")
            lines = commands._activity(session, rows, now)
        finally:
            session.close()
    assert [r["sensor"] for r in rows] == ["busy", "quiet"]
    assert lines == ["······█████·", "▄··········█"]
    assert len(lines[0]) == commands.ACTIVITY_BUCKETS
