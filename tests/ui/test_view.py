"""The pure text pieces of `qsnap ui` (bars, the change strip, dates), and `qsnap ui` itself on a real
pseudo-terminal: it starts, draws and quits with `q`."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from datetime import UTC, datetime, timedelta

from qsnap_testlib import QSNAP, clean_environ, qemu_img

from qsnap.cli.ui.view import bar, compact_date, format_range, strip


def test_bar_fills_eighths_of_cells():
    assert bar(0, 100, 4) == "····"
    assert bar(100, 100, 4) == "████"
    assert bar(50, 100, 4) == "██··"
    assert bar(1, 10**9, 4) == "▏···"  # anything above zero shows
    assert bar(5, 0, 3) == "···"


def test_strip_marks_every_cell_holding_a_changed_byte():
    size = 1000
    assert strip([], size, 10) == "·" * 10
    assert strip([(0, 1)], size, 10) == "█" + "·" * 9
    assert strip([(99, 2)], size, 10) == "██" + "·" * 8  # straddles cells 0 and 1
    assert strip([(999, 1)], size, 10) == "·" * 9 + "█"
    assert strip([(0, size)], size, 10) == "█" * 10
    assert format_range(0x400000, 524288) == "0x000000400000 +524288 (512 KiB)"


def test_compact_date_is_the_time_today_else_the_day():
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).astimezone()
    assert compact_date(now - timedelta(minutes=5), now) == (now - timedelta(minutes=5)).strftime("%H:%M")
    assert compact_date(now - timedelta(days=40), now) == (now - timedelta(days=40)).strftime("%m-%d")


def test_qsnap_ui_runs_on_a_terminal_and_quits(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    qemu_img("snapshot", "-c", "first-1.0", str(image))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = clean_environ({"TERM": "xterm-256color", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    proc = subprocess.Popen([str(QSNAP), "-i", str(image), "ui"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=tmp_path, start_new_session=True)
    os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        while b"first-1.0" not in screen and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        assert b"first-1.0" in screen, screen[-2000:]
        os.write(master, b"q")
        code = proc.wait(timeout=30)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
