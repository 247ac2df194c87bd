"""Review attacks on the fork server, worker groups and workers_per_job (issue 14, start goal).

Real processes and Redis. Tests under a ``FINDING n`` heading failed on the
reviewed main; the others check what was found sound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

from rush_hpc import forkserver
from rush_hpc.launchers.local import is_our_worker
from rush_hpc.launchers.slurm import JobShare, SlurmHandle

from conftest import SECRET, require_cluster, wait_until
from loops import FAST, wl_until_terminated

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable on workers


def _cap_reply_timeout(monkeypatch, seconds: float) -> None:
    """The fork server's 60 s reply timeout, shortened so a test can wait it out."""
    original = forkserver.Template._reply

    def _reply(self, timeout: float):
        return original(self, min(timeout, seconds))

    monkeypatch.setattr(forkserver.Template, "_reply", _reply)


def _bare_env() -> dict[str, str]:
    """An environment without credentials: forked children exit at once (code 2), which is all
    the protocol tests need."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RUSH_HPC")}


# -- FINDING 1: a reply that comes after the 60 s timeout is taken for the next request -------
def test_a_late_reply_is_not_taken_for_the_next_request(monkeypatch, tmp_path):
    _cap_reply_timeout(monkeypatch, 2.0)
    template = forkserver.Template(sys.executable, _bare_env())
    try:
        assert template.room > 0
        out = str(tmp_path / "w.out")
        os.kill(template.process.pid, signal.SIGSTOP)  # frozen (debugger, overloaded node, swap...)
        try:
            processes, error = template.fork("net", [("first", out, out)], _bare_env(), str(tmp_path), [])
            assert processes is None and "did not answer" in (error or "")  # LaunchError(maybe_started)
        finally:
            os.kill(template.process.pid, signal.SIGCONT)
        time.sleep(1.0)  # it answers the first request now, late
        processes, error = template.fork("net", [("second", out, out)], _bare_env(), str(tmp_path), [])
        # LocalLauncher._fork indexes its files by these ids: KeyError 'first', and worker
        # "second" runs without a handle
        assert processes is not None and set(processes) == {"second"}
    finally:
        template.stop()


# -- FINDING 2: exit codes are keyed by pid and never cleared: a reused pid is "exited" at once ---
def _ends_at_once(rush):
    return None


def _set_last_pid(pid: int) -> bool:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(pid))
        return True
    except OSError:
        return False


def test_a_reused_pid_does_not_inherit_an_old_exit_status(rush):
    require_cluster("root", _set_last_pid(int(Path("/proc/sys/kernel/ns_last_pid").read_text())),
                    "choosing the next pid (/proc/sys/kernel/ns_last_pid) needs root")
    first = rush.start_local_workers(worker_loop=_ends_at_once, n_workers=1, **FAST)
    old = rush._supervisor.handles[first[0]]
    assert old.process.wait(30) == 0  # the fork server reported its exit: exit_codes[pid] = 0
    for _ in range(20):  # other processes on the machine may take the pid first: try again
        _set_last_pid(old.pid - 1)
        ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
        handle = rush._supervisor.handles[ids[0]]
        if handle.pid == old.pid:
            break
        rush.stop_workers(type="kill", worker_ids=ids)
    else:
        require_cluster("a reused pid", False, "another process took the pid 20 times in a row")
    try:
        # fails here: "worker ...: process <pid> exited with code 0 before registering" (the old exit code)
        rush.wait_for_workers(worker_ids=ids, timeout=60)
        assert is_our_worker(handle.pid, ids[0])  # it runs...
        assert handle.gone() is None  # ...but its handle says "process <pid> exited with code 0"
        assert rush.detect_lost_workers() == []
    finally:
        rush.stop_workers(type="kill", worker_ids=ids)


# -- FINDING 3: a shared SLURM job whose other workers ended normally is never cancelled ---------
def test_a_shared_job_is_cancelled_when_its_last_running_worker_is_lost(rush, monkeypatch):
    from unit.fakes import install

    fake = install(monkeypatch, {"scancel": "", "sacct": "7_0|RUNNING\n", "squeue": ""})
    import rush_hpc

    workers = {}
    for worker_id in ("a", "b"):
        worker = rush_hpc.RushWorker(network=rush.network, config=rush.config, worker_id=worker_id, secret=SECRET)
        worker.register(launcher="slurm", job_id="7_0", job_workers="a,b", heartbeat_period="0.2",
                        heartbeat_expire="1")
        workers[worker_id] = worker
    share = JobShare(["a", "b"])
    rush._supervisor.add([SlurmHandle(w, "7_0", share=share) for w in ("a", "b")])
    # a ends normally (its loop returned); b's node freezes: no beat, the job still RUNNING
    assert workers["a"].set_state("terminated", ("running",)) == "running"
    time.sleep(1.5)  # past b's heartbeat_expire (b never beat)
    assert wait_until(rush.detect_lost_workers, 10, what="b lost") == ["b"]
    assert ["scancel", "--", "7_0"] in fake.of("scancel")  # nothing else will ever end the job
    for worker in workers.values():
        worker.close()


# -- FINDING 4: workers_per_job x a string cpus_per_worker ------------------------------------
def test_workers_per_job_with_cpus_per_worker_given_as_text():
    from rush_hpc import ConfigError
    from rush_hpc.launchers.sbatch import SbatchLauncher
    from rush_hpc.launchers.slurm import SubmititLauncher

    for make in (lambda: SbatchLauncher("/logs", cpus_per_worker="2", workers_per_job=4).directives(1, "b")
                 ["cpus-per-task"],
                 lambda: SubmititLauncher("/logs", cpus_per_worker="2", workers_per_job=4).parameters["cpus_per_task"]):
        try:
            cpus = make()
        except ConfigError:
            continue  # refusing the text is fine too
        assert int(cpus) == 8


# -- FINDING 5: interpreter-level environment of later starts is the first start's --------------
def _hash_of_abc(rush):
    import os
    import sys

    xs = {"hash": hash("abc"), "seed": os.environ.get("PYTHONHASHSEED"), "flag": sys.flags.hash_randomization}
    rush.push_results(rush.push_running_tasks([xs]), [{"y": 1}])


def test_a_later_start_honours_interpreter_variables(rush, monkeypatch):
    forkserver.stop_templates()  # a fork server started now, with the environment of this moment
    first = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=first, timeout=60)
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # e.g. for reproducible set order
    ids = rush.start_local_workers(worker_loop=_hash_of_abc, n_workers=1, **FAST)
    wait_until(lambda: ids[0] in rush.worker_ids(state="terminated"), 30, what="the worker to end")
    expected = int(subprocess.run([sys.executable, "-c", "print(hash('abc'))"], env={**os.environ},
                                  capture_output=True, text=True, check=True).stdout)
    row = rush.fetch_finished_tasks().iloc[0]
    rush.stop_workers(type="kill", worker_ids=first)
    assert row["seed"] == "0"  # the environment variable is there ...
    assert row["hash"] == expected  # ... but the seed in use is the fork server's random one


# -- FINDING 6: one stray stdout line of the fork server's interpreter -------------------------
def test_a_banner_on_the_fork_servers_stdout_is_skipped(monkeypatch, tmp_path):
    _cap_reply_timeout(monkeypatch, 10.0)
    (tmp_path / "sitecustomize.py").write_text("print('welcome to the cluster')\n")
    env = {**_bare_env(), "PYTHONPATH": str(tmp_path)}
    template = forkserver.Template(sys.executable, env)
    try:
        assert template.room > 0 or not template.alive  # read past the banner, or know it is broken
    finally:
        template.stop()
        if template.process.stdout is not None:
            template.process.stdout.close()  # the dead reader thread left it open


# -- sound: checks that pass ---------------------------------------------------------------------
def _draw(rush):
    import random

    from rush_hpc.network import new_task_id

    xs = {"r": random.random(), "task_id": new_task_id()}
    rush.push_results(rush.push_running_tasks([xs]), [{"y": 1}])


def test_forked_workers_draw_different_random_numbers(rush):
    ids = rush.start_local_workers(worker_loop=_draw, n_workers=4, **FAST)
    wait_until(lambda: len(rush.worker_ids(state="terminated")) == 4, 60, what="the workers to end")
    rows = rush.fetch_finished_tasks()
    assert len(set(rows["r"])) == 4 and len(set(rows["task_id"])) == 4 and len(set(rows["keys"])) == 4
    assert len(ids) == 4


def _start_group(rush, tmp_path, worker_id_args: list[str]) -> subprocess.Popen:
    """A worker group as a job script starts it: one `rush-hpc worker` process for several ids."""
    from rush_hpc.credentials import write_credentials

    credentials = tmp_path / "credentials.json"
    write_credentials(str(credentials), rush.config, SECRET)
    env = {**os.environ, "RUSH_HPC_CREDENTIALS": str(credentials), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "rush_hpc", "worker", "--network", rush.network,
                             *worker_id_args, "--log-dir", str(tmp_path)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reap_group(rush, parent: subprocess.Popen) -> None:
    """Leave nothing of a group behind: its children, every worker's process group, the parent."""
    for child in psutil.Process(parent.pid).children() if parent.poll() is None else []:
        child.kill()
    for pid in [int(p) for p in rush.worker_info.get("pid", [])]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if parent.poll() is None:
        parent.kill()
    parent.wait()


def test_sigterm_to_a_group_ends_every_worker_terminated_and_leaves_nothing_running(rush, tmp_path):
    rush.store_worker_loop(wl_until_terminated, **FAST)
    ids = ["t-a", "t-b", "t-c"]
    parent = _start_group(rush, tmp_path, ["--worker-id", ",".join(ids)])
    try:
        rush.wait_for_workers(worker_ids=ids, timeout=60)
        family = [parent.pid] + [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        workers = [int(rush.worker_info.set_index("worker_id").loc[w, "pid"]) for w in ids]
        heartbeats = [c.pid for w in workers for c in psutil.Process(w).children()]
        assert len(heartbeats) == 3 and set(workers) <= set(family)
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(30) == 0
        assert sorted(rush.worker_ids(state="terminated")) == sorted(ids)

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(lambda: all(gone(p) for p in workers + heartbeats), 10, what="no process left")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()


# -- FINDING 7: a forked worker ends with os._exit: no atexit handlers, no interpreter shutdown ---
def _leaves_things_for_exit(rush):
    import atexit
    import os
    import threading
    import time

    folder = os.environ["RUSH_TEST_EXIT_DIR"]
    atexit.register(lambda: open(os.path.join(folder, f"{rush.worker_id}.atexit"), "w").close())

    def upload() -> None:  # a non-daemon thread: a fresh interpreter waits for it before exiting
        time.sleep(0.5)
        open(os.path.join(folder, f"{rush.worker_id}.thread"), "w").close()

    threading.Thread(target=upload).start()


@pytest.mark.parametrize("fork", [
    pytest.param("0", id="interpreter"),
    pytest.param("1", id="forked"),
])
def test_a_worker_exits_like_an_interpreter(rush, monkeypatch, tmp_path, fork):
    monkeypatch.setenv(forkserver.FORK_ENV, fork)
    monkeypatch.setenv("RUSH_TEST_EXIT_DIR", str(tmp_path))
    ids = rush.start_local_workers(worker_loop=_leaves_things_for_exit, n_workers=1, **FAST)
    handle = rush._supervisor.handles[ids[0]]
    assert handle.process.wait(30) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(ids[0])) == \
        [f"{ids[0]}.atexit", f"{ids[0]}.thread"]


# -- FINDING 8: a stop signal that reaches a group while it is still forking ---------------------
def test_sigterm_during_a_groups_start_reaches_every_worker(rush, tmp_path):
    rush.store_worker_loop(wl_until_terminated, **FAST)
    ids = [f"early-{i}" for i in range(16)]
    parent = _start_group(rush, tmp_path, ["--worker-id", ",".join(ids)])
    group = psutil.Process(parent.pid)
    try:
        wait_until(group.children, 30, poll=0.0005, what="the first worker to be forked")
        os.kill(parent.pid, signal.SIGSTOP)  # hold it mid-start (deterministic: the rest are not forked yet)
        forked = len(group.children())
        os.kill(parent.pid, signal.SIGTERM)  # e.g. `kill <group>` / scancel right after the start
        os.kill(parent.pid, signal.SIGCONT)
        assert forked < len(ids)
        assert parent.wait(15) == 0  # every worker got SIGTERM and ended (terminated) ...
        assert rush.worker_ids(state="running") == []  # ... none runs on
    finally:
        _reap_group(rush, parent)


def test_two_threads_starting_at_once_share_one_fork_server_and_leave_no_zombie(rush):
    """adapt() and the main thread may start workers at the same moment (first use: both want to
    start the fork server)."""
    import threading

    forkserver.stop_templates()
    started: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            started.append(rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(started) == 2
    ids = started[0] + started[1]
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    servers = [p for p in psutil.Process().children() if "--fork-server" in p.cmdline()]
    assert len(servers) == 1
    handles = [rush._supervisor.handles[w] for w in ids]
    assert {h.process.template.process.pid for h in handles} == {servers[0].pid}
    rush.stop_workers(type="terminate")
    assert all(h.process.wait(30) == 0 for h in handles)
    assert not [c for c in servers[0].children() if c.status() == psutil.STATUS_ZOMBIE]


# -- FINDING 9: the pid checks take a group parent for any of its workers ------------------------
def test_a_group_parent_does_not_pass_for_one_of_its_workers(rush, tmp_path):
    from rush_hpc.launchers.base import HandleContext
    from rush_hpc.launchers.local import LocalHandle

    rush.store_worker_loop(wl_until_terminated, **FAST)
    ids = ["pg-a", "pg-b"]
    parent = _start_group(rush, tmp_path, ["--worker-id", "pg-a", "--worker-id", "pg-b"])
    try:
        rush.wait_for_workers(worker_ids=ids, timeout=60)
        worker_pid = int(rush.worker_info.set_index("worker_id").loc["pg-a", "pid"])
        # a record of worker pg-a that names the group's pid instead of its own
        forged = LocalHandle.from_info("pg-a", {"launcher": "local", "host": __import__("socket").gethostname(),
                                                "pid": str(parent.pid)}, HandleContext())
        assert not is_our_worker(parent.pid, "pg-a")
        forged.kill()
        assert parent.poll() is None and psutil.pid_exists(worker_pid)
    finally:
        _reap_group(rush, parent)


# -- FINDING 10: a trusted forked worker that changed its process title cannot be killed ---------
def _retitled_busy(rush):
    import time

    from rush_hpc.spawner import set_cmdline

    set_cmdline(["trainer: epoch 1"])  # what setproctitle (used by many frameworks) does
    while True:  # a loop that never looks at rush.terminated
        time.sleep(0.05)


@pytest.mark.parametrize("fork", [
    pytest.param("0", id="interpreter"),
    pytest.param("1", id="forked"),
])
def test_kill_reaches_a_worker_that_set_its_process_title(rush, monkeypatch, fork):
    monkeypatch.setenv(forkserver.FORK_ENV, fork)
    ids = rush.start_local_workers(worker_loop=_retitled_busy, n_workers=1, heartbeat_period=None,
                                   heartbeat_expire=None)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    handle = rush._supervisor.handles[ids[0]]
    wait_until(lambda: "trainer" in " ".join(psutil.Process(handle.pid).cmdline()), 10, what="the new title")
    try:
        rush.stop_workers(type="kill", worker_ids=ids)
        assert rush.worker_ids(state="killed") == ids
        assert handle.process.wait(5) == -signal.SIGKILL
    finally:
        try:
            os.killpg(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_record_naming_the_fork_server_never_gets_it_killed(rush):
    from rush_hpc.launchers.base import HandleContext
    from rush_hpc.launchers.local import LocalHandle

    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    server = rush._supervisor.handles[ids[0]].process.template
    forged = LocalHandle.from_info(ids[0], {"launcher": "local", "host": __import__("socket").gethostname(),
                                            "pid": str(server.process.pid)}, HandleContext())
    assert forged.gone() is not None  # not this worker
    forged.kill()
    time.sleep(0.2)
    assert server.alive and server.process.poll() is None
    rush.stop_workers(type="terminate")


# -- FINDING 11: what a python= wrapper sets up is dropped in forked workers ---------------------
def _report_wrapper_env(rush):
    import os

    xs = {"wrapped": os.environ.get("RUSH_TEST_WRAPPED", "")}
    rush.push_results(rush.push_running_tasks([xs]), [{"y": 1}])


@pytest.mark.parametrize("fork", [
    pytest.param("0", id="interpreter"),
    pytest.param("1", id="forked"),
])
def test_a_python_wrapper_sets_up_the_workers_environment(rush, monkeypatch, tmp_path, fork):
    monkeypatch.setenv(forkserver.FORK_ENV, fork)
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f"#!/bin/sh\nexport RUSH_TEST_WRAPPED=1\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    ids = rush.start_local_workers(worker_loop=_report_wrapper_env, n_workers=1, python=str(wrapper), **FAST)
    wait_until(lambda: rush.worker_ids(state="terminated") == ids, 30, what="the worker to end")
    assert rush.fetch_finished_tasks().iloc[0]["wrapped"] == "1"


def test_a_forked_controller_gets_its_own_fork_server_and_the_parents_keeps_working(rush):
    first = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    parent_server = rush._supervisor.handles[first[0]].process.template
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a copy of the controller (multiprocessing with fork, a daemonised script)
        code = 1
        try:
            os.close(read)
            ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
            server = rush._supervisor.handles[ids[0]].process.template.process.pid
            os.write(write, f"{ids[0]} {server}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_worker, child_server = pipe.read().split()
    assert os.waitpid(pid, 0)[1] == 0
    assert int(child_server) != parent_server.process.pid
    more = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    assert rush._supervisor.handles[more[0]].process.template is parent_server
    rush.wait_for_workers(worker_ids=[*first, child_worker, *more], timeout=60)
    rush.stop_workers(type="terminate")
