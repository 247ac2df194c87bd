"""The progress display: on a terminal only (never in logs, CI or pytest), or when forced."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading

from rush_hpc import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def interactive(monkeypatch):
    """As a person at a terminal: no CI, no pytest marker, no setting (call it in the test: pytest sets
    PYTEST_CURRENT_TEST again after the fixtures ran)."""
    for name in ("CI", "PYTEST_CURRENT_TEST", "RUSH_HPC_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")


def test_auto_shows_only_on_a_terminal(monkeypatch):
    interactive(monkeypatch)
    assert progress.enabled(None, FakeTerminal()) is True
    assert progress.enabled(None, io.StringIO()) is False  # a pipe or a log file
    monkeypatch.setenv("CI", "true")
    assert progress.enabled(None, FakeTerminal()) is False
    monkeypatch.delenv("CI")
    monkeypatch.setenv("RUSH_HPC_PROGRESS", "0")
    assert progress.enabled(None, FakeTerminal()) is False
    assert progress.enabled(True, io.StringIO()) is True and progress.enabled(False, FakeTerminal()) is False


def test_off_under_pytest_by_default():
    assert "PYTEST_CURRENT_TEST" in os.environ
    assert progress.enabled(None, FakeTerminal()) is False


def test_a_disabled_tracker_counts_silently():
    stream = io.StringIO()
    with progress.tracker(total=10, description="tasks", progress=False, stream=stream) as bar:
        bar.update(done=4)
        bar.update(advance=2, extra="x")
    assert not bar.shown and bar.done == 6 and stream.getvalue() == ""


def test_a_shown_tracker_draws_count_and_extra(monkeypatch):
    interactive(monkeypatch)
    stream = FakeTerminal()
    with progress.tracker(total=10, description="tasks", stream=stream) as bar:
        bar.update(done=7, extra="3 running")
    assert bar.shown
    out = stream.getvalue()
    assert "tasks" in out and "7/10" in out and "3 running" in out


def test_the_demo_draws_a_bar_in_a_terminal_and_nothing_in_a_pipe(redis_config):
    url = redis_config.to_url(show_secrets=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_CURRENT_TEST", "RUSH_HPC_PROGRESS")}
    env["TERM"] = "xterm"
    command = [sys.executable, "-m", "rush_hpc", "demo", "random-search", "--workers", "2", "--tasks", "300",
               "--url", url, "--network", "progress-demo"]
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    result = subprocess.run(command, stderr=slave, stdout=subprocess.PIPE, env=env, timeout=120, text=True)
    os.close(slave)
    reader.join(10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert result.returncode == 0 and "best y =" in result.stdout
    assert "finished" in terminal and "/300" in terminal and "workers ·" in terminal
    piped = subprocess.run(command, capture_output=True, env=env, timeout=120, text=True)
    assert piped.returncode == 0 and "/300" not in piped.stderr and "━" not in piped.stderr
