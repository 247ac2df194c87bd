"""Pure parts of forking workers: the SSH group lines, command lines shown by forked children."""

from __future__ import annotations

import shlex
import subprocess
import sys

from rush_hpc import spawner
from rush_hpc.launchers.base import WorkerCommand
from rush_hpc.launchers.local import worker_argv_matches
from rush_hpc.launchers.ssh import group_lines


def test_group_lines_start_one_interpreter_with_every_id_quoted():
    command = WorkerCommand("net-1", "/opt/my env/python")
    lines = group_lines(command, ["a1", "b2"])
    start = next(line for line in lines if line.startswith("nohup setsid"))
    words = shlex.split(start.split(">")[0].replace('"$RUSH_LOG_DIR"', "LOG"))
    assert words[2:] == ["/opt/my env/python", "-m", "rush_hpc", "worker", "--network", "net-1",
                         "--worker-id", "a1", "--worker-id", "b2", "--log-dir", "LOG", "--pid-file", "LOG/a1.pids"]
    assert start.endswith("&") and "group=$!" in lines
    # a group that never wrote its pids: every worker is reported as the group, with its output
    fallback = lines[-1]
    assert 'echo "pid a1 $group"' in fallback and 'echo "pid b2 $group"' in fallback
    assert 'cp "$RUSH_LOG_DIR"/a1.group.log "$RUSH_LOG_DIR"/b2.log' in fallback


def test_the_group_lines_run_in_bash_and_report_a_group_that_died():
    lines = group_lines(WorkerCommand("net", "/bin/false"), ["a1", "b2"], wait=5)
    script = "\n".join(["set -e", 'RUSH_LOG_DIR=$(mktemp -d)', *lines, 'rm -rf "$RUSH_LOG_DIR"'])
    output = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True).stdout
    reported = [line.split() for line in output.splitlines()]
    assert [r[:2] for r in reported] == [["pid", "a1"], ["pid", "b2"]] and reported[0][2] == reported[1][2]


def test_a_rewritten_command_line_matches_its_worker_only():
    shown = spawner.worker_argv("/usr/bin/python3", "net", "w1") + [""] * 20  # NUL padding reads as ''
    assert worker_argv_matches(shown, "w1") and not worker_argv_matches(shown, "w2")


def test_set_cmdline_rewrites_this_process_in_place():
    code = ("import sys; from rush_hpc import spawner; "
            "assert spawner.set_cmdline(['py', '-m', 'rush_hpc', 'worker', '--worker-id', 'x']); "
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').decode())")
    out = subprocess.run([sys.executable, "-c", code, "padding" * 10], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "py\0-m\0rush_hpc\0worker\0--worker-id\0x"
    too_long = "import sys; from rush_hpc import spawner; print(spawner.set_cmdline(['x' * 100000]))"
    assert subprocess.run([sys.executable, "-c", too_long], capture_output=True, text=True,
                          timeout=30).stdout.strip() == "False"
