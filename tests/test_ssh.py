"""SSH launcher against real sshd "hosts": network namespaces with their own hostname and address.

scripts/test-cluster starts them (rush-h1..3 on a private bridge 10.231.0.0/24); Redis listens on
the bridge address with a password, as it would on a login node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest

import rush_hpc
from rush_hpc.examples.random_search import wl_random_search
from rush_hpc import LaunchError
from rush_hpc.config import RedisConfig

from loops import wl_queue_slow as wl_queue
from conftest import SECRET, require_cluster, start_redis_server, stop, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ssh
PASSWORD = "ssh-redis-pw-7f3a"
LOOPBACK = os.environ.get("RUSH_TEST_SSH_MODE") == "loopback"  # scripts/test-cluster's fallback
FAST = {"heartbeat_period": 0.25, "heartbeat_expire": 1.5}


def _hosts() -> list[str]:
    return [h for h in os.environ.get("RUSH_TEST_SSH_HOSTS", "").split(",") if h]


@pytest.fixture(scope="module")
def ssh_env():
    hosts = _hosts()
    ok = bool(hosts) and subprocess.run(
        ["ssh", "-F", os.environ.get("RUSH_TEST_SSH_CONFIG", "/nonexistent"), hosts[0], "true"],
        capture_output=True, timeout=20).returncode == 0
    require_cluster("ssh hosts", ok, "RUSH_TEST_SSH_HOSTS unset or host unreachable")
    return {"hosts": hosts, "ssh_config": os.environ["RUSH_TEST_SSH_CONFIG"],
            "connect_kwargs": {"key_filename": os.environ["RUSH_TEST_SSH_KEY"], "look_for_keys": False,
                               "allow_agent": False}}


@pytest.fixture(scope="module")
def bridge_redis(ssh_env, tmp_path_factory):
    bridge = os.environ["RUSH_TEST_BRIDGE_IP"]
    binds = list(dict.fromkeys(["127.0.0.1", bridge]))
    process, port = start_redis_server(tmp_path_factory.mktemp("redis-ssh"), "--bind", *binds,
                                       "--requirepass", PASSWORD)
    yield RedisConfig(host=bridge, port=port, password=PASSWORD)
    stop(process)


@pytest.fixture
def srush(bridge_redis, network):
    controller = rush_hpc.rsh(network=network, config=bridge_redis, secret=SECRET)
    yield controller
    controller.reset()
    controller.close()


def ssh(ssh_env, host: str, command: str) -> str:
    return subprocess.run(["ssh", "-F", ssh_env["ssh_config"], host, command], capture_output=True,
                          text=True, timeout=30).stdout


SEARCH = {"rush_n_tasks": 100}  # globals of the vignette loop from rush_hpc.examples


def wl_env(rush):
    import os

    rush.push_results(rush.push_running_tasks([{"x": 1}]), [{"nasty": os.environ["NASTY"]}])


def start(srush, ssh_env, loop=wl_random_search, hosts=None, **kwargs):
    return srush.start_ssh_workers(worker_loop=loop, hosts=hosts or ssh_env["hosts"],
                                   ssh_config=ssh_env["ssh_config"],
                                   connect_kwargs=ssh_env["connect_kwargs"], **{**FAST, **kwargs})


def test_workers_on_three_hosts_run_the_random_search(srush, ssh_env):
    ids = start(srush, ssh_env, n_workers=2, globals=SEARCH)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    info = srush.worker_info.set_index("worker_id").loc[ids]
    assert sorted(set(info.host)) == sorted(ssh_env["hosts"])
    if LOOPBACK:
        print("loopback fallback: the hosts share one hostname, so only the host labels are checked")
    else:
        assert sorted(set(info.hostname)) == sorted(ssh_env["hosts"])  # each namespace has its own
    assert (info.launcher == "ssh").all() and info.pid.notna().all()
    wait_until(lambda: set(srush.worker_ids(state="terminated")) == set(ids), 60, what="workers to end")
    frame = srush.fetch_finished_tasks()
    assert len(frame) >= 100 and set(frame["worker_id"]) <= set(ids)


def test_bad_host_is_named_and_the_other_hosts_still_start(srush, ssh_env):
    with pytest.raises(LaunchError, match=r"(?s)1 of 2 host\(s\).*10\.231\.0\.99: cannot connect") as error:
        start(srush, ssh_env, loop=wl_queue, hosts=[ssh_env["hosts"][0], "10.231.0.99"], connect_timeout=2)
    started = error.value.started
    assert len(started) == 1
    srush.wait_for_workers(worker_ids=started, timeout=30)
    states = srush.worker_info.set_index("worker_id")["state"]
    assert sorted(states) == ["failed", "running"]


def test_failing_setup_command_reports_the_remote_output(srush, ssh_env):
    with pytest.raises(LaunchError, match=r"(?s)rush-h2.*exited with 127.*no_such_module_cmd"):
        start(srush, ssh_env, loop=wl_queue, hosts=[ssh_env["hosts"][1]],
              setup=["echo preparing", "no_such_module_cmd load python"])


def test_nasty_values_stay_values(srush, ssh_env):
    nasty = "a'; touch /tmp/rush-pwned-$$; echo \"$(id)\" `id` \\ end"
    ids = start(srush, ssh_env, loop=wl_env, hosts=ssh_env["hosts"][:1], env={"NASTY": nasty},
                log_dir="~/.rush-hpc/logs with space")
    wait_until(lambda: srush.n_finished_tasks == 1, 30, what="the task")
    assert srush.fetch_finished_tasks()["nasty"][0] == nasty
    assert not list(Path("/tmp").glob("rush-pwned-*"))
    assert srush.worker_info.set_index("worker_id").loc[ids[0], "state"] == "terminated"


def test_secrets_are_not_on_the_remote_command_line(srush, ssh_env):
    log_dir = f"/tmp/rush-secrets-{uuid.uuid4().hex[:8]}"
    ids = start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:1], log_dir=log_dir)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    processes = ssh(ssh_env, ssh_env["hosts"][0], "ps -eo args")
    assert ids[0] in processes
    assert PASSWORD not in processes and SECRET.decode() not in processes
    # the credentials file (mktemp: 0600, O_EXCL, random name) is gone once the workers registered
    assert ssh(ssh_env, ssh_env["hosts"][0], f"ls {log_dir} | grep -c credentials || true").strip() == "0"


def test_kill_through_redis_and_by_ssh_when_the_worker_does_not_answer(srush, ssh_env):
    srush.push_tasks([{"sleep": 60}])
    ids = start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:1], n_workers=2)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    pids = {w: int(p) for w, p in srush.worker_info.set_index("worker_id")["pid"].items()}
    # the namespaces share the PID space: freeze one worker so that only SSH can kill it
    os.kill(pids[ids[1]], signal.SIGSTOP)
    srush.stop_workers(type="kill", kill_grace=1.0)
    assert set(srush.worker_ids(state="killed")) == set(ids)
    for pid in pids.values():
        wait_until(lambda: "Z" in (ssh(ssh_env, ssh_env["hosts"][0], f"ps -o stat= -p {pid}") or "Z"), 10,
                   what=f"process {pid} to die")
    assert srush.n_running_tasks == 0 and srush.n_failed_tasks == 1


def test_host_whose_link_goes_down_loses_its_workers_and_nothing_is_lost(srush, ssh_env):
    require_cluster("network namespaces", not LOOPBACK, "the loopback fallback cannot take one host's link down")
    keys = srush.push_tasks([{"sleep": 5}] * 2 + [{"sleep": 0.01}] * 20, max_retries=1)
    ids = start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:2], n_workers=1)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    wait_until(lambda: srush.n_running_tasks == 2, 10, what="both slow tasks to run")
    h2 = srush.worker_info.set_index("hostname").loc[ssh_env["hosts"][1], "worker_id"]
    subprocess.run(["ip", "-n", ssh_env["hosts"][1], "link", "set", "eth0", "down"], check=True)
    try:
        cut = time.monotonic()
        lost = wait_until(srush.detect_lost_workers, FAST["heartbeat_expire"] + 3, what="lost worker")
        assert lost == [h2] and time.monotonic() - cut <= FAST["heartbeat_expire"] + 3
        assert "heartbeat expired" in srush.worker_info.set_index("worker_id").loc[h2, "reason"]
        srush.wait_for_tasks(keys, timeout=60)  # the surviving worker finishes everything, retries included
    finally:
        subprocess.run(["ip", "-n", ssh_env["hosts"][1], "link", "set", "eth0", "up"], check=True)
    assert srush.n_finished_tasks + srush.n_failed_tasks == len(keys) and srush.n_running_tasks == 0


def test_gateway_jumps_through_another_host(srush, ssh_env):
    target_log = Path(ssh_env["ssh_config"]).parent / "sshd_h2.log"
    before = target_log.read_text().count("Connection from")
    ids = start(srush, ssh_env, loop=wl_queue, hosts=[ssh_env["hosts"][1]], gateway=ssh_env["hosts"][0])
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    connections = [line for line in target_log.read_text().splitlines() if "Connection from" in line]
    assert len(connections) > before
    if not LOOPBACK:  # the target saw the gateway's address, not the controller's
        assert "Connection from 10.231.0.11 " in connections[-1], connections[-1]


def test_remote_worker_that_never_registers_is_reported_with_its_remote_log(srush, ssh_env, tmp_path):
    broken = tmp_path / "python"  # the namespaces share this filesystem
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libpython3.11.so' >&2\nexit 127\n")
    broken.chmod(0o755)
    start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:1], python=str(broken))
    with pytest.raises(rush_hpc.WorkerStartError,
                       match=r"(?s)exited before registering.*end of its output.*libpython3\.11\.so"):
        srush.wait_for_workers(1, timeout=30)


def test_a_second_controller_never_sshes_to_hosts_from_redis(srush, ssh_env, bridge_redis, monkeypatch):
    ids = start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:1], n_workers=1)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    # a Redis writer points the worker at another host; a second controller has no host list at all
    srush.redis.hset(srush.keys.worker(ids[0]), "host", ssh_env["hosts"][2])
    from rush_hpc.launchers.ssh import SSHLauncher

    def refuse(*args, **kwargs):
        raise AssertionError("a controller connected to a host named only in Redis")

    monkeypatch.setattr(SSHLauncher, "connect", refuse)
    second = rush_hpc.rsh(network=srush.network, config=bridge_redis, secret=SECRET)
    assert second.detect_lost_workers() == [] and second._supervisor.unchecked == ids
    second.close()
    monkeypatch.undo()
    srush.stop_workers(type="kill", kill_grace=0.5)  # the first controller's handle holds the real host
    assert srush.worker_ids(state="killed") == ids


def test_a_worker_cut_off_killed_and_reset_is_gone_soon_after_its_link_comes_back(srush, ssh_env):
    """Issue 10: link down, then kill and reset while the worker cannot hear it, then link up: the
    worker must exit within about two heartbeat periods and create nothing in the reset network."""
    require_cluster("network namespaces", not LOOPBACK, "the loopback fallback cannot take one host's link down")
    period = 1.0
    host = ssh_env["hosts"][1]
    srush.push_tasks([{"sleep": 0.05}] * 10000)
    [worker_id] = start(srush, ssh_env, loop=wl_queue, hosts=[host], n_workers=1, connect_timeout=3,
                        heartbeat_period=period, heartbeat_expire=3.0)
    srush.wait_for_workers(worker_ids=[worker_id], timeout=30)
    pid = int(srush.worker_info.set_index("worker_id").loc[worker_id, "pid"])
    subprocess.run(["ip", "-n", host, "link", "set", "eth0", "down"], check=True)
    try:
        wait_until(lambda: worker_id in srush.detect_lost_workers(), 10, what="the cut-off worker lost")
        srush.stop_workers(type="kill", worker_ids=[worker_id])  # cannot reach it: its host is cut off
        srush.reset()
    finally:
        subprocess.run(["ip", "-n", host, "link", "set", "eth0", "up"], check=True)
    up = time.monotonic()
    wait_until(lambda: "Z" in (ssh(ssh_env, host, f"ps -o stat= -p {pid}") or "Z"), 15, poll=0.05,
               what="the worker to exit after link up")
    took = time.monotonic() - up
    print(f"cut-off worker gone {took:.2f} s after its link came back")
    assert took <= 2 * period + 1.0, f"gone {took:.1f} s after the link came back (2 periods: {2 * period} s)"
    time.sleep(2 * period)
    assert list(srush.redis.scan_iter(match=srush.keys.pattern)) == []  # it created nothing after the reset


def test_remote_credentials_have_a_random_name_and_are_deleted_once_the_workers_registered(srush, ssh_env):
    host = ssh_env["hosts"][0]
    log_dir = f"/tmp/rush-cred-{uuid.uuid4().hex[:8]}"
    ids = start(srush, ssh_env, loop=wl_queue, hosts=[host], n_workers=2, log_dir=log_dir)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    assert ssh(ssh_env, host, f"ls {log_dir} | grep -c credentials || true").strip() == "0"
    # a log directory others may write to is refused (they could swap the file before it is read)
    shared = f"/tmp/rush-shared-{uuid.uuid4().hex[:8]}"
    ssh(ssh_env, host, f"mkdir -p {shared} && chmod 777 {shared}")
    with pytest.raises(LaunchError, match="not writable by group/others"):
        start(srush, ssh_env, loop=wl_queue, hosts=[host], n_workers=1, log_dir=shared)
    assert ssh(ssh_env, host, f"ls {shared} | grep -c credentials || true").strip() == "0"


def test_a_hosts_workers_are_forked_by_one_interpreter_and_killed_one_by_one(srush, ssh_env):
    import psutil

    ids = start(srush, ssh_env, loop=wl_queue, hosts=ssh_env["hosts"][:1], n_workers=2)
    srush.wait_for_workers(worker_ids=ids, timeout=30)
    pids = {w: int(p) for w, p in srush.worker_info.set_index("worker_id")["pid"].items()}
    parents = {psutil.Process(pid).ppid() for pid in pids.values()}  # the namespaces share the PID space
    assert len(parents) == 1 and len(set(pids.values())) == 2
    group = psutil.Process(parents.pop())
    # one interpreter for the host's workers; its title names none of them (never passes for one)
    assert "--group" in group.cmdline() and not any(w in group.cmdline() for w in ids)
    assert all(os.getsid(pid) == pid for pid in pids.values())  # each worker in its own session
    os.kill(pids[ids[0]], signal.SIGSTOP)  # only SSH can kill it now
    srush.stop_workers(type="kill", worker_ids=ids[:1], kill_grace=1.0)
    wait_until(lambda: "Z" in (ssh(ssh_env, ssh_env["hosts"][0], f"ps -o stat= -p {pids[ids[0]]}") or "Z"), 10,
               what="the killed worker to die")
    time.sleep(1.0)
    assert srush.worker_ids(state="running") == ids[1:] and group.is_running()
    srush.stop_workers(type="terminate", worker_ids=ids[1:])
    wait_until(lambda: not group.is_running() or group.status() == psutil.STATUS_ZOMBIE, 30,
               what="the group to exit once its last worker ended")
