"""Handles rebuilt from a worker hash (what a Redis writer controls) are validated strictly:
nothing read from Redis names a file to read, a pid to signal, a job to cancel or a host to ssh to."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from rush_hpc.launchers.base import HandleContext, handle_from_info, handle_type
from rush_hpc.launchers.local import LocalHandle, worker_argv_matches
from rush_hpc.launchers.slurm import SbatchHandle, SlurmHandle
from rush_hpc.launchers.ssh import SSHLauncher, SshHandle

from .fakes import install

WID = "0123456789abcdef0123456789abcdef"
HOST = socket.gethostname()
EMPTY = HandleContext()


def test_registry_knows_every_launcher_and_nothing_else():
    assert handle_type("local") is LocalHandle and handle_type("ssh") is SshHandle
    assert handle_type("slurm") is SlurmHandle and handle_type("sbatch") is SbatchHandle
    assert handle_type("script") is None and handle_type(None) is None
    assert handle_from_info(WID, {"launcher": "script", "pid": "123"}, EMPTY) is None


@pytest.mark.parametrize("handle", [
    LocalHandle(WID, 4242, host="node1", stdout=None, stderr=None),
    SlurmHandle(WID, "12_3", stdout="/logs/o", stderr="/logs/e"),
    SbatchHandle(WID, "12_3", job_script="/logs/j.sh"),
])
def test_round_trip_through_the_worker_hash_drops_the_paths(handle):
    info = handle.to_info()
    if isinstance(handle, LocalHandle):
        info["host"] = HOST
    rebuilt = handle_from_info(WID, info, EMPTY)
    assert type(rebuilt) is type(handle) and not rebuilt.trusted
    assert all(not getattr(rebuilt, name, None) for name in ("stdout", "stderr", "job_script"))


@pytest.mark.parametrize("pid", ["1", "0", "-1", "", "abc", "1 2", "99999999", "+5", None])
def test_pids_that_would_signal_everything_are_refused(pid):
    assert handle_from_info(WID, {"launcher": "local", "host": HOST, "pid": pid}, EMPTY) is None


def test_local_worker_of_another_host_is_not_ours_to_check():
    assert handle_from_info(WID, {"launcher": "local", "host": "elsewhere", "pid": "4242"}, EMPTY) is None


@pytest.mark.parametrize("worker_id", ["", "../x", "a b", "x" * 200, "-rf", "a\nb"])
def test_worker_ids_are_validated(worker_id):
    assert handle_from_info(worker_id, {"launcher": "slurm", "job_id": "12"}, EMPTY) is None


@pytest.mark.parametrize("job_id", ["--user=alice", "-1", "12 13", "12,13", "", None, "12_3_4"])
def test_slurm_job_ids_are_validated(job_id):
    assert handle_from_info(WID, {"launcher": "slurm", "job_id": job_id}, EMPTY) is None


def test_a_live_process_that_is_not_this_worker_is_never_signalled():
    """A Redis writer points a worker's pid at one of our other processes: not killed."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        handle = handle_from_info(WID, {"launcher": "local", "host": HOST, "pid": str(victim.pid)}, EMPTY)
        assert handle is not None
        assert handle.gone() == f"process {victim.pid} is gone"  # it is not our worker
        handle.kill()
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_worker_itself_is_recognised_by_its_command_line():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "rush_hpc", "worker",
                               "--network", "n", "--worker-id", WID], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while WID not in " ".join(psutil.Process(worker.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        handle = handle_from_info(WID, {"launcher": "local", "host": HOST, "pid": str(worker.pid)}, EMPTY)
        assert handle is not None and handle.gone() is None
        other = handle_from_info("f" * 32, {"launcher": "local", "host": HOST, "pid": str(worker.pid)}, EMPTY)
        assert other is not None and other.gone() is not None  # same pid, other worker id: not it
        handle.kill()
        assert worker.wait(10) == -9
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_worker_argv_matching():
    argv = ["/venv/bin/python", "-m", "rush_hpc", "worker", "--network", "n", "--worker-id", WID]
    assert worker_argv_matches(argv, WID)
    assert not worker_argv_matches(argv, "other")
    assert not worker_argv_matches(["sleep", "--worker-id", WID], WID)


def test_output_is_read_only_through_trusted_handles(tmp_path):
    secret = tmp_path / "credentials.json"
    secret.write_text('{"password": "hunter2"}')
    info = {"launcher": "local", "host": HOST, "pid": str(os.getpid()), "stdout": str(secret),
            "stderr": str(secret)}
    untrusted = handle_from_info(WID, info, EMPTY)
    assert untrusted is not None and untrusted.output_tail() == ""
    for info in ({"launcher": "slurm", "job_id": "5", "stdout": str(secret), "stderr": str(secret)},
                 {"launcher": "sbatch", "job_id": "5_1", "stderr": str(secret)}):
        handle = handle_from_info(WID, info, EMPTY)
        assert handle is not None and handle.output_tail() == ""
    trusted = LocalHandle(WID, os.getpid(), stdout=secret, stderr=secret)
    assert "hunter2" in trusted.output_tail()  # the controller's own file: shown


def ssh_launcher(*hosts: str) -> SSHLauncher:
    return SSHLauncher(list(hosts), network="n", credentials=b"{}", python="/usr/bin/python3")


def test_ssh_hosts_only_from_the_controllers_own_list(monkeypatch):
    info = {"launcher": "ssh", "host": "alice@node2:2222", "pid": "4242", "stdout": "/etc/shadow"}
    assert handle_from_info(WID, info, EMPTY) is None  # a second controller without the list: unknown
    assert handle_from_info(WID, info, HandleContext(ssh=[ssh_launcher("node1")])) is None
    launcher = ssh_launcher("node1", "alice@node2:2222")
    handle = handle_from_info(WID, info, HandleContext(ssh=[launcher]))
    assert isinstance(handle, SshHandle) and handle.host is launcher.hosts[1] and handle.log is None
    assert handle.output_tail() == ""  # never a remote path from Redis either
    for pid in ("1", "x", "0"):
        assert handle_from_info(WID, {**info, "pid": pid}, HandleContext(ssh=[launcher])) is None


def test_the_remote_kill_checks_the_command_line_first(monkeypatch):
    launcher = ssh_launcher("node1")
    scripts = []

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(launcher, "connect", lambda host: Connection())
    monkeypatch.setattr(launcher, "_exec", lambda connection, script, **kw: scripts.append(script) or (0, "", ""))
    SshHandle.kill_all([SshHandle(WID, launcher, launcher.hosts[0], 4242, trusted=False)])
    (script,) = scripts
    assert "ps -ww -o args= -p 4242 2>/dev/null" in script
    assert f'*" -m rush_hpc worker --network "{launcher.network}" --worker-id "{WID}" "*) true' in script
    assert "then kill -KILL -- -4242" in script


def test_slurm_handles_from_redis_are_checked_in_one_batch(monkeypatch):
    fake = install(monkeypatch, {"sacct": "8_0|FAILED\n8_1|RUNNING\n"})
    handles = [handle_from_info(f"w{i}", {"launcher": "sbatch", "job_id": f"8_{i}"}, EMPTY) for i in range(2)]
    assert SbatchHandle.check(handles) == {"w0": "SLURM job 8_0 ended FAILED"}
    assert len(fake.of("sacct")) == 1
