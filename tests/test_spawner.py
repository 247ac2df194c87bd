"""Workers forked from one interpreter: the local fork server and worker groups (SSH / SLURM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

from rush_hpc import forkserver, spawner
from rush_hpc.credentials import write_credentials
from rush_hpc.launchers.local import LocalHandle, is_our_worker

from conftest import SECRET, wait_until
from loops import FAST, wl_until_terminated

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable on workers


def _handles(rush, ids) -> list[LocalHandle]:
    return [rush._supervisor.handles[w] for w in ids]


@pytest.mark.parametrize("n", [4, 16])
def test_forked_local_workers_register_each_with_its_own_process(rush, n):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=n, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    handles = _handles(rush, ids)
    assert all(isinstance(h.process, forkserver.ForkedProcess) for h in handles)
    pids = [h.pid for h in handles]
    assert len(set(pids)) == n
    info = rush.worker_info.set_index("worker_id")
    assert [int(info.loc[w, "pid"]) for w in ids] == pids  # the pid the worker recorded is its own
    for worker_id, pid in zip(ids, pids):
        assert os.getsid(pid) == pid  # its own session: killing its group spares the others
        shown = [a for a in psutil.Process(pid).cmdline() if a]  # padded with NULs: '' at the end
        assert shown == spawner.worker_argv(sys.executable, rush.network, worker_id)
        assert is_our_worker(pid, worker_id) and not is_our_worker(pid, ids[ids.index(worker_id) - 1])
    rush.stop_workers(type="terminate")
    wait_until(lambda: set(rush.worker_ids(state="terminated")) == set(ids), 30, what="terminated")
    assert all(h.process.wait(10) == 0 for h in handles)  # exit statuses come back from the fork server


def test_killing_one_forked_worker_leaves_its_siblings_running(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=3, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    rush.stop_workers(type="kill", worker_ids=ids[:1])
    first, *others = _handles(rush, ids)
    assert first.process.wait(10) == -signal.SIGKILL
    assert rush.worker_ids(state="killed") == ids[:1]
    time.sleep(3 * FAST["heartbeat_period"])
    assert rush.detect_lost_workers() == []
    assert sorted(rush.worker_ids(state="running")) == sorted(ids[1:])
    assert all(h.gone() is None for h in others)


def test_a_frozen_forked_worker_is_lost_alone(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    frozen, other = _handles(rush, ids)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        assert wait_until(rush.detect_lost_workers, FAST["heartbeat_expire"] + 5, what="lost") == [frozen.worker_id]
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert frozen.process.wait(10) == -signal.SIGKILL  # ended by its own heartbeat child
    assert rush.worker_ids(state="running") == [other.worker_id] and other.gone() is None


def test_workers_outlive_a_killed_fork_server_and_stay_checkable(rush):
    """SIGKILL of the fork server: its workers go on (as workers outlive their controller); their
    handles fall back to checking the process (no exit status any more) and can still kill them."""
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    handles = _handles(rush, ids)
    template = handles[0].process.template
    template.process.kill()
    wait_until(lambda: not template.alive, 10, what="the fork server to be gone")
    assert all(h.process.orphaned and h.gone() is None for h in handles)
    rush.stop_workers(type="kill", worker_ids=ids[:1])
    wait_until(lambda: handles[0].gone(), 10, what="the killed worker to be gone")
    assert "is gone" in handles[0].gone()
    assert handles[1].gone() is None and rush.worker_ids(state="running") == ids[1:]
    # the next start gets a new fork server
    more = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=more, timeout=60)
    assert rush._supervisor.handles[more[0]].process.template is not template


def test_fork_server_off_starts_one_interpreter_per_worker(rush, monkeypatch):
    monkeypatch.setenv(forkserver.FORK_ENV, "0")
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    assert all(isinstance(h.process, subprocess.Popen) for h in _handles(rush, ids))


def test_forked_workers_get_the_controllers_environment_and_directory(rush, tmp_path, monkeypatch):
    module = tmp_path / "helper_module_xyz.py"
    module.write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUSH_TEST_MARK", "seen")

    def loop(rush):
        import os

        import helper_module_xyz

        xs = {"cwd": os.getcwd(), "mark": os.environ.get("RUSH_TEST_MARK"), "value": helper_module_xyz.VALUE}
        rush.push_results(rush.push_running_tasks([xs]), [{"y": 1}])

    ids = rush.start_local_workers(worker_loop=loop, n_workers=1, **FAST)
    wait_until(lambda: rush.worker_ids(state="terminated") == ids, 30, what="the worker to end")
    row = rush.fetch_finished_tasks().iloc[0]
    assert (row["cwd"], row["mark"], row["value"]) == (str(tmp_path), "seen", 42)


# -- groups: `python -m rush_hpc worker --worker-id A --worker-id B` ---------------------------
def _start_group(rush, tmp_path: Path, ids: list[str], *extra: str) -> subprocess.Popen[bytes]:
    credentials = tmp_path / "credentials.json"
    write_credentials(str(credentials), rush.config, SECRET)
    env = {**os.environ, "RUSH_HPC_CREDENTIALS": str(credentials), "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "rush_hpc", "worker", "--network", rush.network]
    for worker_id in ids:
        argv += ["--worker-id", worker_id]
    return subprocess.Popen(argv + list(extra), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_a_group_forks_one_worker_per_id_and_passes_signals_on(rush, tmp_path):
    rush.store_worker_loop(wl_until_terminated, **FAST)
    ids = ["group-a", "group-b"]
    pid_file = tmp_path / "pids"
    parent = _start_group(rush, tmp_path, ids, "--log-dir", str(tmp_path), "--pid-file", str(pid_file))
    try:
        rush.wait_for_workers(worker_ids=ids, timeout=60)
        pids = dict(line.split() for line in pid_file.read_text().splitlines())
        assert sorted(pids) == ids
        info = rush.worker_info.set_index("worker_id")
        for worker_id in ids:
            pid = int(pids[worker_id])
            assert int(info.loc[worker_id, "pid"]) == pid and psutil.Process(pid).ppid() == parent.pid
            shown = [a for a in psutil.Process(pid).cmdline() if a]  # padded with NULs: '' at the end
            assert shown[-4:] == ["--network", rush.network, "--worker-id", worker_id] and os.getsid(pid) == pid
            log = tmp_path / f"{worker_id}.log"
            wait_until(lambda: "hello from the loop" in log.read_text(), 10, what="the worker's own log")
        os.kill(parent.pid, signal.SIGUSR2)  # what SLURM sends to the batch shell before the time limit
        assert parent.wait(30) == 0
        assert sorted(rush.worker_ids(state="terminated")) == ids
        assert set(rush.worker_info["reason"]) == {"walltime"}
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stdout.close()


def test_a_group_member_killed_alone_leaves_its_sibling(rush, tmp_path):
    rush.store_worker_loop(wl_until_terminated, **FAST)
    ids = ["solo-a", "solo-b"]
    parent = _start_group(rush, tmp_path, ["solo-a,solo-b"])  # a comma list, as job scripts pass it
    try:
        rush.wait_for_workers(worker_ids=ids, timeout=60)
        victim = int(rush.worker_info.set_index("worker_id").loc["solo-a", "pid"])
        os.killpg(victim, signal.SIGKILL)
        wait_until(lambda: victim not in [c.pid for c in psutil.Process(parent.pid).children()], 10,
                   what="the killed worker to be reaped by its group")
        time.sleep(3 * FAST["heartbeat_period"])
        assert parent.poll() is None and "solo-b" in rush.worker_ids(state="running")
        rush.stop_workers(type="terminate", worker_ids=["solo-b"])
        assert parent.wait(30) == 0  # all ended; how is in Redis (a job state must not blame the sibling)
        assert b"worker solo-a" in parent.stdout.read()  # the one that died is named
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stdout.close()


def test_a_sigkilled_controller_with_embedded_redis_leaves_no_worker_or_fork_server(tmp_path):
    """The fork server exits when its controller's pipe closes; the workers lose the embedded Redis
    with their controller and end after its outage timeout (5 s)."""
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import rush_hpc; from loops import FAST, "
              "wl_until_terminated; r = rush_hpc.rsh(network='x'); "
              "ids = r.start_local_workers(wl_until_terminated, n_workers=2, **FAST); r.wait_for_workers(2, timeout=30); "
              "h = [r._supervisor.handles[w] for w in ids]; "
              "print(*[x.pid for x in h], h[0].process.template.process.pid, flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                         text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3, out.stderr

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(p) for p in pids), 15, poll=0.1, what="workers and fork server to exit")


def test_pid_checks_match_the_exact_worker_id_and_network_never_a_group_title():
    """The local check (psutil) and the SSH one (a shell ``case`` on ``ps`` output, run here by
    /bin/sh) on real processes showing a worker's and a group's command line."""
    from rush_hpc.launchers.ssh import SshHandle

    class Launcher:
        network = "net-1"

    processes = []

    def shown(argv: list[str]) -> int:  # a process that shows argv, as a forked worker / group does
        code = "import json, sys, time; from rush_hpc.spawner import set_cmdline; " \
               "set_cmdline(json.loads(sys.argv[1])); time.sleep(30)"
        process = subprocess.Popen([sys.executable, "-c", code, json.dumps(argv), "." * 400])
        processes.append(process)
        wait_until(lambda: [a for a in psutil.Process(process.pid).cmdline() if a] == argv, 10, what="the title")
        return process.pid

    worker = shown(spawner.worker_argv(sys.executable, "net-1", "ab-1"))
    group = shown([sys.executable, "-m", "rush_hpc", "worker", "--network", "net-1", "--group", "2"])

    def ssh_match(pid: int, worker_id: str, network: str) -> bool:
        handle = SshHandle.__new__(SshHandle)
        handle.pid, handle.worker_id, handle.ssh = pid, worker_id, Launcher()
        Launcher.network = network
        return subprocess.run(["/bin/sh", "-c", handle._match()]).returncode == 0

    try:
        for match in (lambda p, w, n: is_our_worker(p, w, n), ssh_match):
            assert match(worker, "ab-1", "net-1")
            assert not match(worker, "ab", "net-1") and not match(worker, "b-1", "net-1")
            assert not match(worker, "ab-1", "net-") and not match(worker, "ab-1", "net-12")
            assert not match(group, "ab-1", "net-1") and not match(group, "2", "net-1")
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _retitled(rush):
    import time

    from rush_hpc.spawner import set_cmdline

    set_cmdline(["trainer: epoch 1"])  # what setproctitle does
    while not rush.terminated:
        time.sleep(0.05)


def test_a_retitled_worker_of_a_killed_fork_server_stays_checkable_and_killable(rush):
    """Without its fork server, a forked worker is recognised by pid + start time, not by title."""
    ids = rush.start_local_workers(worker_loop=_retitled, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    (handle,) = _handles(rush, ids)
    wait_until(lambda: "trainer" in " ".join(psutil.Process(handle.pid).cmdline()), 10, what="the new title")
    template = handle.process.template
    template.process.kill()
    wait_until(lambda: not template.alive, 10, what="the fork server to be gone")
    assert handle.process.orphaned and handle.gone() is None
    assert rush.detect_lost_workers() == []
    rush.stop_workers(type="kill", worker_ids=ids)
    wait_until(lambda: not psutil.pid_exists(handle.pid) or psutil.Process(handle.pid).status() == "zombie", 10,
               what="the worker to die")
    assert "is gone" in (handle.gone() or "")


def test_a_later_start_gets_the_controllers_umask_and_removed_variables(rush, monkeypatch):
    forkserver.stop_templates()  # a fork server started now, with this environment and umask
    monkeypatch.setenv("RUSH_TEST_LATER_GONE", "first")
    first = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=first, timeout=60)
    monkeypatch.delenv("RUSH_TEST_LATER_GONE")
    old = os.umask(0o027)

    def report(rush):
        import os

        mask = os.umask(0)
        xs = {"gone": os.environ.get("RUSH_TEST_LATER_GONE", "-"), "umask": mask}
        rush.push_results(rush.push_running_tasks([xs]), [{"y": 1}])

    try:
        ids = rush.start_local_workers(worker_loop=report, n_workers=1, **FAST)
    finally:
        os.umask(old)
    wait_until(lambda: ids[0] in rush.worker_ids(state="terminated"), 30, what="the worker to end")
    assert rush._supervisor.handles[ids[0]].process.template is rush._supervisor.handles[first[0]].process.template
    row = rush.fetch_finished_tasks().iloc[0]
    rush.stop_workers(type="terminate", worker_ids=first)
    assert (row["gone"], int(row["umask"])) == ("-", 0o027)


def test_a_fork_server_that_did_not_answer_is_replaced_at_the_next_start(monkeypatch, tmp_path):
    original = forkserver.Template._reply
    monkeypatch.setattr(forkserver.Template, "_reply", lambda self, timeout: original(self, min(timeout, 2.0)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUSH_HPC")}  # children exit at once
    forkserver.stop_templates()
    first = forkserver.template(sys.executable, env)
    assert first is not None and forkserver.template(sys.executable, env) is first
    out = str(tmp_path / "w.out")
    os.kill(first.process.pid, signal.SIGSTOP)  # frozen past the reply timeout
    try:
        assert first.fork("net", [("w", out, out)], env, str(tmp_path), [])[0] is None
    finally:
        os.kill(first.process.pid, signal.SIGCONT)
    try:
        second = forkserver.template(sys.executable, env)
        assert second is not None and second is not first and second.alive
        assert first.process.poll() is not None  # stopped and reaped
    finally:
        forkserver.stop_templates()
