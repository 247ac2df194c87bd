"""Review of issue 16's login-node submission (commit 7691148), on the real test cluster: rush-h3 is the
login node (its sshd sets SLURM_CONF). Where a link fault is needed, the SSH connection goes through
tests/faults.py's DroppingProxy (loopback -> rush-h3:22).

The review's findings 1 (forged record cancels a foreign job), 2 (a lost reply re-sends sbatch or the
credentials write), 3 (a silent link hangs a call), 5 (a log_dir under a directory others can write) and 9
(forged records overflow the sacct command line) are tests here, fixed; the others check what was found sound.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import cloudpickle
import pytest

from rush_hpc.exceptions import LaunchError
from rush_hpc.launchers.base import WorkerCommand
from rush_hpc.launchers.login import LoginNode
from rush_hpc.launchers.sbatch import SbatchLauncher

from conftest import SECRET, wait_until
from faults import DroppingProxy
import test_slurm_login
from test_slurm_login import SLURM, on_login

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.slurm, pytest.mark.ssh]
login_env, laptop = test_slurm_login.login_env, test_slurm_login.laptop  # the fixtures


def _login_ip(login_env) -> str:
    out = subprocess.run(["ssh", "-G", "-F", login_env["ssh_config"], login_env["login"]], capture_output=True,
                         text=True, timeout=10).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("hostname "))


class MutingProxy(DroppingProxy):
    """``lose_reply()``: the server's bytes are swallowed for ``delay`` s (the request got through and
    the command ran), then every connection is cut: a reply lost after the command ran, for sure."""

    cuts = 0

    def lose_reply(self, delay: float = 1.5) -> None:
        self.mute = True

        def cut() -> None:
            import socket

            self.mute = False
            self.cuts += 1
            for sock in list(self._sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Timer(delay, cut).start()


@pytest.fixture
def proxied(login_env, tmp_path):
    """A LoginNode for rush-h3 whose SSH connection passes through a fault proxy on loopback."""
    proxy = MutingProxy(22, _login_ip(login_env))
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    node = LoginNode(f"root@127.0.0.1:{proxy.port}", ssh_config=str(config), connect_timeout=5,
                     connect_kwargs=login_env["connect_kwargs"])
    yield node, proxy
    _cut(proxy)
    node.close()


def _on_exec(monkeypatch, when: str, action) -> None:
    """Run ``action`` (once) right before paramiko sends an exec request whose command contains ``when``."""
    from paramiko.channel import Channel

    original = Channel.exec_command
    done: list[bool] = []

    def exec_command(self, command):
        if not done and when in (command.decode() if isinstance(command, bytes) else command):
            done.append(True)
            action()
        return original(self, command)

    monkeypatch.setattr(Channel, "exec_command", exec_command)


def _jobs_named(login_env, name: str) -> list[str]:
    return on_login(login_env, f"squeue -h -r -n {name} -o %i").split()


def test_a_lost_reply_to_sbatch_never_submits_twice(proxied, login_env, tmp_path, monkeypatch):
    node, proxy = proxied
    name = f"review-{uuid.uuid4().hex[:8]}"
    launcher = SbatchLauncher(str(tmp_path / "twice"), login=node, job_name=name, partition="debug", time=2,
                              setup=["sleep 60"])
    _on_exec(monkeypatch, "sbatch --parsable", proxy.lose_reply)  # sshd gets the request, its reply is lost
    try:
        try:
            launcher.start(["w1"], WorkerCommand("net", "python3"))
        except LaunchError as error:
            assert error.maybe_started  # the acceptable outcome: unknown, reported, not re-sent
        assert proxy.cuts == 1
        jobs = wait_until(lambda: _jobs_named(login_env, name), 10, poll=0.5, what="the job in squeue")
        assert len(jobs) == 1, f"sbatch ran {len(jobs)} times: jobs {jobs}"
    finally:
        on_login(login_env, f"scancel -n {name}")


def test_a_silent_link_does_not_hang_a_login_node_call_forever(proxied, monkeypatch):
    node, proxy = proxied
    node.call(["true"], timeout=5)  # connected

    def go_silent() -> None:
        proxy.down = True  # bytes swallowed both ways, nothing closed (a laptop's link gone to sleep)

    _on_exec(monkeypatch, "squeue", go_silent)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try(node.call, ["squeue", "-h"], timeout=5)),
                              daemon=True)
    thread.start()
    thread.join(30)  # 6 x the call's own timeout
    hung = thread.is_alive()
    _cut(proxy)  # let the thread go
    assert not hung, "LoginNode.call(timeout=5) still blocked after 30 s (lock held: monitor/adapt/close wait)"


def _cut(proxy: DroppingProxy) -> None:
    """Close the proxied connections for real (FIN/RST to paramiko), then the proxy."""
    import socket

    for sock in proxy._sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    proxy.close()


def _try(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test looks at
        return error


def _forge_running_worker(rush, fields: dict[str, str]) -> str:
    """What a Redis writer without the secret can write: a 'running' worker record."""
    worker_id = uuid.uuid4().hex
    pipe = rush.redis.pipeline(transaction=False)
    pipe.hset(rush.keys.worker(worker_id), mapping={"worker_id": worker_id, "state": "running",
                                                    "started_at": "1", "heartbeat_period": "1",
                                                    "heartbeat_expire": "1", **fields})
    pipe.sadd(rush.keys.workers, worker_id)
    pipe.sadd(rush.keys.worker_state_set("running"), worker_id)
    pipe.execute()
    return worker_id


def test_a_forged_worker_record_cannot_cancel_a_job_that_is_not_ours(laptop, login_env):
    victim = on_login(login_env, "sbatch --parsable -p debug -t 2 -J review-victim --wrap 'sleep 100'").strip()
    try:
        assert victim.isdigit()
        wait_until(lambda: "RUNNING" in on_login(login_env, f"squeue -h -j {victim} -o %T"), 20, poll=0.5,
                   what="the victim job to run")
        # the controller holds the login node (as after any start_sbatch_workers(login=...))
        options = {k: v for k, v in login_env.items() if k in ("ssh_config", "connect_kwargs")}
        laptop._login_node(login_env["login"], options)
        # the label is public: every legitimate record carries it in field "login"
        _forge_running_worker(laptop, {"launcher": "sbatch", "job_id": f"{victim}", "login": login_env["login"]})
        laptop.detect_lost_workers()  # what the monitor thread and adapt do every few seconds
        cancelled = _try(wait_until, lambda: "CANCELLED" in on_login(login_env, f"squeue -h -t all -j {victim} -o %T") +
                         on_login(login_env, f"sacct -n -X -P -o State -j {victim}"), 8, poll=0.5)
        assert isinstance(cancelled, AssertionError), f"job {victim} (not ours) was cancelled by the controller"
    finally:
        on_login(login_env, f"scancel {victim}")


def test_a_log_dir_whose_parent_others_can_write_is_refused(login_env, tmp_path):
    node = LoginNode(login_env["login"], ssh_config=login_env["ssh_config"],
                     connect_kwargs=login_env["connect_kwargs"])
    shared = tmp_path / "project"
    shared.mkdir()
    shared.chmod(0o777)  # a group project directory: another member can rename logs/ and put their own
    try:
        with pytest.raises(LaunchError, match="writable"):
            node.private_directory(str(shared / "logs"))
    finally:
        node.close()


@pytest.mark.parametrize("plant", ["symlink", "group-writable", "not ours"])
def test_a_planted_or_shared_log_dir_is_refused(login_env, tmp_path, plant):
    """Sound: a symlink planted as log_dir, a group-writable log_dir, one owned by another user."""
    node = LoginNode(login_env["login"], ssh_config=login_env["ssh_config"],
                     connect_kwargs=login_env["connect_kwargs"])
    log_dir = tmp_path / "logs"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if plant == "symlink":  # to a directory of another user (a symlink to one of ours is resolved and used)
        log_dir.symlink_to(elsewhere)
        subprocess.run(["chown", "nobody", str(elsewhere)], check=True)
    elif plant == "group-writable":
        log_dir.mkdir()
        log_dir.chmod(0o770)
    else:
        log_dir.mkdir(mode=0o700)
        subprocess.run(["chown", "nobody", str(log_dir)], check=True)
    try:
        with pytest.raises(LaunchError, match="owned by|writable by"):
            node.write_private_file(str(log_dir), "credentials-", b"secret")
        assert not list(elsewhere.iterdir())
    finally:
        node.close()


def test_nasty_log_dir_and_setup_values_reach_the_cluster_intact(laptop, login_env, tmp_path):
    """Sound: spaces, quotes, $(...) and a leading dash in log_dir; a setup line with quotes."""
    from rush_hpc.examples.random_search import wl_random_search

    marker = tmp_path / "pwned"
    log_dir = str(tmp_path / f"-a 0'; touch {marker}; echo \"$(touch {marker})\"")
    ids = laptop.start_sbatch_workers(wl_random_search, n_workers=1, globals={"rush_n_tasks": 5}, log_dir=log_dir,
                                      setup=["export NOTE='it''s \"fine\"'"], **login_env, **SLURM)
    laptop.wait_for_workers(worker_ids=ids, timeout=60)
    wait_until(lambda: set(laptop.worker_ids(state="terminated")) == set(ids), 60, what="the worker to end")
    assert not marker.exists()
    from pathlib import Path

    files = sorted(p.name for p in Path(log_dir).iterdir())
    assert any(f.endswith("-0.out") for f in files) and not any(f.startswith("credentials-") for f in files)
    for name in files:
        assert SECRET.decode() not in (Path(log_dir) / name).read_text(errors="replace")


def test_many_forged_records_do_not_blind_sacct_for_our_own_jobs(login_env):
    from rush_hpc.launchers.slurm import SbatchHandle

    node = LoginNode(login_env["login"], ssh_config=login_env["ssh_config"],
                     connect_kwargs=login_env["connect_kwargs"])
    job = on_login(login_env, "sbatch --parsable -p debug -t 1 -J review-ours --wrap true").strip()
    try:
        wait_until(lambda: "COMPLETED" in on_login(login_env, f"sacct -n -X -P -o State -j {job}"), 30, poll=0.5,
                   what="our job to complete")
        ours = SbatchHandle(uuid.uuid4().hex, job, login=node)
        # what handle_from_info builds from forged records naming our login node: valid, but not ours
        forged = [SbatchHandle(uuid.uuid4().hex, f"{9000000 + i // 1000}_{i % 1000}", login=node, trusted=False)
                  for i in range(12000)]
        assert SbatchHandle.final_states([ours, *forged]).get(ours.worker_id) == "COMPLETED"
    finally:
        node.close()


def test_a_swapped_log_dir_cannot_redirect_the_job_output(laptop, login_env, request):
    from loops import wl_hold

    import shutil
    from pathlib import Path

    base = Path(f"/tmp/review-{uuid.uuid4().hex[:8]}")  # reachable by `nobody` (pytest's tmp_path is not)
    base.mkdir(mode=0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    shared = base / "project"
    shared.mkdir()
    shared.chmod(0o777)  # group-writable project directory (g+w; here o+w to let `nobody` play the member)
    victim = base / "precious.txt"
    victim.write_text("precious\n")
    log_dir = shared / "logs"
    # refused before anything is written or submitted: the other user could swap the directory between
    # our check and SLURM opening the job's output at job start
    with pytest.raises(LaunchError, match="writable by others"):
        laptop.start_sbatch_workers(wl_hold, n_workers=1, log_dir=str(log_dir),
                                    extra_directives={"begin": "now+12"}, **login_env, **SLURM)
    assert not laptop.worker_ids() and victim.read_text() == "precious\n"
    assert not list(log_dir.iterdir())


def test_a_lost_reply_to_the_credentials_write_leaves_no_secret_file_behind(proxied, tmp_path, monkeypatch):
    node, proxy = proxied
    directory = tmp_path / "creds"
    _on_exec(monkeypatch, "cat >", proxy.lose_reply)
    result = _try(node.write_private_file, str(directory), "credentials-", b'{"secret": "s3cr3t"}')
    assert proxy.cuts == 1
    known = {result} if isinstance(result, str) else set()  # what the controller can remove later
    files = {str(p) for p in directory.iterdir()}
    assert files <= known, f"secret files the controller does not know of: {sorted(files - known)}"
