"""``rush-hpc top``: the frame arithmetic (rates, ETA) and the live view against real workers."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading

from rush_hpc.top import Sample, WorkerRow, eta_text, rate, render

from conftest import wait_until


def sample(now: float, finished: int, workers: list[WorkerRow] | None = None) -> Sample:
    counts = {"running_workers": 1, "queued": 2, "queued_priority": 1, "running": 3, "finished": finished,
              "failed": 0, "total": finished + 6}
    return Sample(now, counts, workers or [])


def test_rate_and_eta_come_from_the_samples():
    assert rate([(100.0, 10)]) is None
    assert rate([(100.0, 10), (102.0, 60)]) == 25.0
    assert rate([(100.0, 10), (101.0, 20), (104.0, 70)]) == 15.0
    assert eta_text(100, 100, 5.0, 0) == "reached (100 of 100)"
    assert eta_text(10, 100, 0.0, 0) == "10% of 100 · ETA - (no progress yet)"
    assert eta_text(10, 100, 30.0, 0).startswith("10% of 100 · ETA 0:03 (")
    assert eta_text(0, 100_000, 10.0, 0).startswith("0% of 100,000 · ETA 2:46:40 (")


def test_a_frame_fits_80_columns_and_highlights_lost_workers():
    workers = [WorkerRow("a" * 32, "running", "node-with-a-long-name", "123", finished=40, running=1,
                         heartbeat=999.5, started=900.0),
               WorkerRow("b" * 32, "lost", "node2", "456", finished=10,
                         reason="heartbeat expired (no beat for 5 s) and a very long explanation that goes on")]
    lines = render(sample(1000.0, 50, workers), [(990.0, 20), (998.0, 40), (1000.0, 50)], target=100,
                   network="net")
    text = [line.text for line in lines]
    assert all(len(t) <= 80 for t in text)
    assert text[1] == "workers  1 running, 1 lost" and lines[1].style == "bold red"
    assert text[2] == "tasks    3 queued · 3 running · 50 finished · 0 failed"
    assert text[3] == "rate     5.0 tasks/s (last 2.0 s) · 3.0/s over 10 s"
    assert re.fullmatch(r"target   50% of 100 · ETA 0:17 \(\d\d:\d\d:\d\d [+-]\d\d:\d\d\)", text[4])
    running = next(line for line in lines if line.text.startswith("aaaaaaaa "))
    lost = next(line for line in lines if line.text.startswith("bbbbbbbb "))
    assert re.search(r"running\s+node-with-a-\s+123\s+40\s+1\s+0\.5s\s+since ", running.text)
    assert re.fullmatch(r"bbbbbbbb  lost\s+node2\s+456\s+10\s+0\s+-", lost.text)
    reason = lines[lines.index(lost) + 1]
    assert reason.text == "          reason: heartbeat expired (no beat for 5 s) and a very long explanatio"
    assert lost.style == reason.style == "bold red" and running.style is None
    full = render(sample(1000.0, 50, workers), [(1000.0, 50)], full_ids=True, width=200)
    assert any(line.text.startswith("a" * 32) for line in full)
    assert "- tasks/s (measuring)" in full[3].text
    empty = sample(1000.0, 0)
    empty.counts.update(total=0)
    assert render(empty, [(1000.0, 0)])[-1].text == "(no workers and no tasks yet: is --network right?)"


def wl_three_tasks(rush) -> None:
    import time

    for i in range(3):
        rush.push_results(rush.push_running_tasks([{"x": i}]), [{"y": i * 2}])
    while not rush.terminated:
        time.sleep(0.05)


def test_top_once_against_real_workers(rush, redis_config, tmp_path):
    ids = rush.start_local_workers(wl_three_tasks, n_workers=2, log_dir=str(tmp_path))
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    wait_until(lambda: rush.n_finished_tasks == 6, 30, what="6 finished tasks")
    doomed = ids[1]
    os.kill(int(rush.worker_info.set_index("worker_id").loc[doomed, "pid"]), signal.SIGKILL)
    wait_until(lambda: doomed in rush.detect_lost_workers() or doomed in rush._ids_in_state("lost"), 10,
               what="the killed worker found lost")
    env = {**os.environ, "RUSH_HPC_URL": redis_config.to_url(show_secrets=True), "RUSH_HPC_NETWORK": rush.network}
    result = subprocess.run([sys.executable, "-m", "rush_hpc", "top", "--once", "--target", "10", "--interval",
                             "0.3"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(rf"rush-hpc top · {rush.network} · \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d", lines[0])
    assert lines[1] == "workers  1 running, 1 lost"
    assert lines[2] == "tasks    0 queued · 0 running · 6 finished · 0 failed"
    assert re.fullmatch(r"rate     0\.0 tasks/s \(last 0\.\d s\)", lines[3])
    assert lines[4] == "target   60% of 10 · ETA - (no progress yet)"
    alive = next(line for line in lines if line.startswith(ids[0][:8]))
    lost = next(line for line in lines if line.startswith(doomed[:8]))
    assert re.search(r"running .* 3\s+0\s+\d+\.\ds\s+since \d\d:\d\d:\d\d$", alive)
    assert re.search(r"lost .* 3\s+0\s+(\d+\.\ds|-)$", lost)  # the last beat before it died
    assert re.match(r" {10}reason: process \d+ killed by SIGKILL", lines[lines.index(lost) + 1])
    assert max(map(len, lines)) <= 80

    master, slave = pty.openpty()  # on a terminal: drawn in place by rich, lost workers in red
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: _read(master), b"")), daemon=True)
    reader.start()
    live = subprocess.run([sys.executable, "-m", "rush_hpc", "top", "--iterations", "1", "--interval", "0.2"],
                          stdout=slave, stderr=subprocess.PIPE, env={**env, "TERM": "xterm"}, timeout=60)
    os.close(slave)
    reader.join(10)
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert live.returncode == 0, live.stderr
    assert "\x1b[" in screen and "1 running, 1 lost" in screen and doomed[:8] in screen


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
