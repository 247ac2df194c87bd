"""Review of issue 16's login-node submission (commit 7691148): the controller's side, on a real Redis,
with a fake login node at the LoginNode boundary (no SSH). Each test showed a defect of the reviewed
code (FINDING n in the review); all are fixed."""

from __future__ import annotations

import sys
import threading
import time
import uuid

import cloudpickle
import pytest

import rush_hpc.controller
from rush_hpc.launchers.login import LoginNode

from conftest import wait_until
from loops import wl_queue_slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowLogin(LoginNode):
    """A login node with a file system (``files``) and an sbatch that waits for ``release``."""

    instances: list[SlowLogin] = []

    def __init__(self, target: str, **options) -> None:
        super().__init__(target, **options)
        self.files: dict[str, bytes] = {}
        self.release = threading.Event()
        self.sbatch_started = threading.Event()
        self.jobs = 0
        SlowLogin.instances.append(self)

    def home(self) -> str:
        return "/home/alice"

    def private_directory(self, directory: str) -> str:
        return directory

    def write_private_file(self, directory: str, prefix: str, content: bytes) -> str:
        path = f"{directory}/{prefix}{uuid.uuid4().hex[:12]}"
        self.files[path] = content
        return path

    def call(self, cmd, *, timeout=60, input=None):
        cmd = list(cmd)
        if cmd[0] == "sbatch":
            self.sbatch_started.set()
            self.release.wait(30)  # a slow login node (a busy slurmctld answers sbatch in 10-60 s)
            self.jobs += 1
            return f"{100 + self.jobs}\n"
        if cmd[0] == "rm":
            self.files.pop(cmd[-1], None)
            return ""
        return ""  # sacct / squeue: nothing known yet


@pytest.fixture
def slow_login(monkeypatch):
    SlowLogin.instances.clear()
    monkeypatch.setattr(rush_hpc.controller, "LoginNode", SlowLogin)
    return SlowLogin.instances


def test_close_during_an_adapt_start_leaves_no_credentials_on_the_login_node(rush, slow_login):
    rush.push_tasks([{"x": 1, "sleep": 0.01}])
    rush.adapt(0, 1, launcher="sbatch", worker_loop=wl_queue_slow, interval=0.2, login="alice@login1",
               log_dir="/logs", partition="debug")
    wait_until(lambda: slow_login and slow_login[0].sbatch_started.is_set(), 10, what="adapt's sbatch")
    [login] = slow_login
    closing = threading.Thread(target=rush.close)
    closing.start()
    closing.join(3)
    assert closing.is_alive()  # close() waits for the start under way...
    login.release.set()  # ...until sbatch answers at last
    closing.join(20)
    assert not closing.is_alive()
    wait_until(lambda: not any(t.name.startswith("rush-adapt") for t in threading.enumerate()), 10,
               what="the adapt thread to end")
    time.sleep(0.2)
    leaked = [p for p in login.files if "/credentials-" in p]
    assert not leaked, f"credentials left on the login node after close(): {leaked} (jobs submitted: {login.jobs})"


def test_a_record_becomes_checkable_once_this_controller_holds_its_login_node(rush):
    worker_id = uuid.uuid4().hex
    info = {"launcher": "sbatch", "job_id": "12_0", "login": "alice@login1", "state": "running"}
    assert rush._supervisor.handle(worker_id, info) is None  # a login node this controller does not hold
    rush._login_node("alice@login1", {})  # e.g. a second controller that now starts workers there too
    handle = rush._supervisor.handle(worker_id, info)
    assert handle is not None and handle.login is rush._logins[next(iter(rush._logins))]


def test_an_unreachable_login_node_does_not_stop_heartbeat_lost_detection(rush, tmp_path):
    import socket

    from rush_hpc.launchers.slurm import SbatchHandle

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    node = LoginNode(f"alice@127.0.0.1:{port}", ssh_config=str(config), connect_timeout=2,
                     connect_kwargs={"look_for_keys": False, "allow_agent": False})  # the laptop went offline
    ours, silent = uuid.uuid4().hex, uuid.uuid4().hex
    pipe = rush.redis.pipeline(transaction=False)
    for worker_id, fields in ((ours, {"launcher": "sbatch", "job_id": "12_0", "login": node.label,
                                      "heartbeat_expire": "1"}),  # its beat is kept alive below
                              (silent, {"heartbeat_expire": "1"})):  # started by hand; its heartbeat is gone
        pipe.hset(rush.keys.worker(worker_id), mapping={"worker_id": worker_id, "state": "running",
                                                        "started_at": "1", "heartbeat_period": "1", **fields})
        pipe.sadd(rush.keys.workers, worker_id)
        pipe.sadd(rush.keys.worker_state_set("running"), worker_id)
    pipe.set(rush.keys.heartbeat(ours), "1", ex=600)
    pipe.execute()
    rush._supervisor.add([SbatchHandle(ours, "12_0", login=node)])
    time.sleep(2.5)  # past the outage grace (Redis uptime > heartbeat window)
    try:
        assert rush.detect_lost_workers() == [silent]
    finally:  # (reset() in the fixture's teardown raises the same LaunchError while this handle exists)
        rush._supervisor.handles.pop(ours, None)
