"""Issue 16: submission from a laptop. One of the SSH test hosts (its sshd sets SLURM_CONF, as
/etc/slurm/slurm.conf would on a real login node) is the login node; this process has NO SLURM
configuration (SLURM_CONF removed), so every sbatch / squeue / sacct / scancel that works here ran on
the login node over SSH."""

from __future__ import annotations

import os
import subprocess
import sys
import cloudpickle
import pytest

import rush_hpc
from rush_hpc.examples.random_search import wl_random_search

from loops import wl_hold, wl_queue_slow
from conftest import SECRET, require_cluster, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.slurm, pytest.mark.ssh]
SLURM = {"partition": "debug", "time": 5, "heartbeat_period": 0.5, "heartbeat_expire": 3.0}


@pytest.fixture(scope="module")
def login_env():
    hosts = [h for h in os.environ.get("RUSH_TEST_SSH_HOSTS", "").split(",") if h]
    ssh_config = os.environ.get("RUSH_TEST_SSH_CONFIG", "/nonexistent")
    login = hosts[-1] if hosts else ""
    ok = bool(login) and subprocess.run(["ssh", "-F", ssh_config, login, "sacct -n -X -j 1 && sinfo -h -p debug"],
                                        capture_output=True, timeout=30).returncode == 0
    require_cluster("SLURM login node", ok, "no ssh test host, or SLURM commands fail on it")
    return {"login": login, "ssh_config": ssh_config, "python": sys.executable,
            "connect_kwargs": {"key_filename": os.environ["RUSH_TEST_SSH_KEY"], "look_for_keys": False,
                               "allow_agent": False}}


@pytest.fixture
def laptop(login_env, rush, monkeypatch):
    """The controller as on a laptop: no SLURM client configuration here."""
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode != 0
    return rush


def wl_ignore_terminate(rush):
    """Holds a task and never looks at rush.terminated: only SLURM's SIGKILL ends it."""
    import time

    rush.push_running_tasks([{"x": 1}])
    while True:
        time.sleep(0.1)


def on_login(login_env, command: str) -> str:
    return subprocess.run(["ssh", "-F", login_env["ssh_config"], login_env["login"], command],
                          capture_output=True, text=True, timeout=30).stdout


def test_sbatch_through_a_login_node_runs_the_search_and_leaves_no_secret(laptop, login_env, tmp_path):
    log_dir = str(tmp_path / "on-login")
    ids = laptop.start_sbatch_workers(wl_random_search, n_workers=2, globals={"rush_n_tasks": 60},
                                      log_dir=log_dir, **login_env, **SLURM)
    laptop.wait_for_workers(worker_ids=ids, timeout=60)
    info = laptop.worker_info.set_index("worker_id").loc[ids]
    assert (info.launcher == "sbatch").all() and (info.login == login_env["login"]).all()
    # the script and logs were written on the login node (in the directory given, made private)
    files = on_login(login_env, f"ls -A {log_dir}").split()
    assert any(f.startswith("rush-") and not f.endswith((".out", ".err")) for f in files)
    assert on_login(login_env, f"stat -c %a {log_dir}").strip() == "700"
    for name in files:
        assert SECRET.decode() not in on_login(login_env, f"cat {log_dir}/{name}")
    wait_until(lambda: set(laptop.worker_ids(state="terminated")) == set(ids), 60, what="workers to end")
    assert laptop.n_finished_tasks >= 60 and laptop.n_running_tasks == 0
    # the credentials file is gone from the login node once the workers registered
    assert not [f for f in on_login(login_env, f"ls -A {log_dir}").split() if f.startswith("credentials-")]
    # the final job states came from sacct on the login node
    wait_until(lambda: laptop.detect_lost_workers() is not None and
               set(laptop.worker_info.set_index("worker_id").loc[ids].job_state) == {"COMPLETED"},
               60, poll=1, what="job_state COMPLETED from sacct on the login node")


def test_kill_through_the_login_node_cancels_the_job(laptop, login_env, tmp_path):
    """The job is still in its setup (no worker to answer the kill message): only scancel on the
    login node can end it."""
    [worker_id] = laptop.start_sbatch_workers(wl_hold, n_workers=1, log_dir=str(tmp_path / "kill"),
                                              setup=["sleep 120"], **login_env, **SLURM)
    job_id = laptop.worker_info.set_index("worker_id").loc[worker_id, "job_id"]
    wait_until(lambda: "RUNNING" in on_login(login_env, f"sacct -n -X -P -o State -j {job_id}"), 30,
               poll=0.5, what="the job to run its setup")
    laptop.stop_workers(type="kill", worker_ids=[worker_id], kill_grace=0.5)
    wait_until(lambda: "CANCELLED" in on_login(login_env, f"sacct -n -X -P -o State -j {job_id}"), 30,
               poll=0.5, what="the job cancelled on the cluster")
    row = laptop.worker_info.set_index("worker_id").loc[worker_id]
    assert row.state == "killed"


def test_a_job_cancelled_on_the_cluster_is_found_lost_through_the_login_node(laptop, login_env, tmp_path):
    [worker_id] = laptop.start_sbatch_workers(wl_ignore_terminate, n_workers=1, log_dir=str(tmp_path / "lost"),
                                              **{**login_env, **SLURM, "heartbeat_expire": 60.0})
    laptop.wait_for_workers(worker_ids=[worker_id], timeout=60)
    wait_until(lambda: laptop.n_running_tasks == 1, 20, what="the task to run")
    job_id = laptop.worker_info.set_index("worker_id").loc[worker_id, "job_id"]
    on_login(login_env, f"scancel {job_id}")  # the heartbeat would take 60 s; sacct knows at once
    wait_until(lambda: laptop.detect_lost_workers() or laptop.worker_ids(state="lost"), 40,
               poll=1, what="the lost worker (before its heartbeat expired)")
    row = laptop.worker_info.set_index("worker_id").loc[worker_id]
    assert row.state == "lost" and "CANCELLED" in row.reason
    assert laptop.n_running_tasks == 0 and laptop.n_failed_tasks == 1


def test_adapt_submits_through_the_login_node(laptop, login_env, tmp_path):
    keys = laptop.push_tasks([{"x": i, "sleep": 0.05} for i in range(60)])
    laptop.adapt(0, 3, launcher="sbatch", worker_loop=wl_queue_slow, interval=0.5, idle_timeout=3,
                 log_dir=str(tmp_path / "adapt"), **login_env, **SLURM)
    laptop.wait_for_tasks(keys, timeout=120)
    wait_until(lambda: not laptop.worker_ids(state=["running", "launched"]), 60, poll=0.5,
               what="idle workers to end")
    laptop.adapt(None)
    assert 1 <= len(laptop.worker_info) <= 6
    assert len(laptop._logins) == 1  # one SSH connection for every start and check
    assert laptop.n_running_tasks == 0 and laptop.fetch_finished_tasks()["keys"].is_unique


def test_a_second_controller_without_the_login_node_does_not_act_on_the_record(laptop, login_env, tmp_path,
                                                                                  redis_config, network):
    [worker_id] = laptop.start_sbatch_workers(wl_hold, n_workers=1, log_dir=str(tmp_path / "second"),
                                              **login_env, **SLURM)
    laptop.wait_for_workers(worker_ids=[worker_id], timeout=60)
    other = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    try:  # it cannot reach the job (no login node of its own); it must not scancel here either
        other.stop_workers(type="kill", worker_ids=[worker_id], kill_grace=1.0)
    finally:
        other.close()
    # the kill message through Redis still ended the worker; the job itself ends with it
    wait_until(lambda: laptop.worker_info.set_index("worker_id").loc[worker_id, "state"] == "killed", 30,
               what="the worker killed through Redis")


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def tunnelled(login_env, tmp_path, network, monkeypatch):
    """Redis that the controller reaches only through an SSH tunnel via the login node
    (``ssh -N -L``), while the workers reach it directly (``worker_address``)."""
    import socket

    from conftest import start_redis_server, stop

    monkeypatch.delenv("SLURM_CONF", raising=False)
    require_cluster("multi-node SLURM partition", bool(os.environ.get("RUSH_TEST_SLURM_MULTI")),
                    "RUSH_TEST_SLURM_MULTI unset: no nodes in network namespaces")
    bridge = os.environ["RUSH_TEST_BRIDGE_IP"]
    process, port = start_redis_server(tmp_path / "redis", "--bind", *dict.fromkeys(["127.0.0.1", bridge]),
                                       "--requirepass", "tunnel-pw-5b1e")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    tunnel = subprocess.Popen(["ssh", "-F", login_env["ssh_config"], "-N", "-o", "ExitOnForwardFailure=yes",
                               "-L", f"127.0.0.1:{local_port}:{bridge}:{port}", login_env["login"]])
    try:
        url = f"redis://:tunnel-pw-5b1e@127.0.0.1:{local_port}"
        wait_until(lambda: _pings(url), 20, poll=0.2, what="the tunnel")
        # the workers run in other network namespaces: the tunnel's 127.0.0.1 end is not theirs
        controller = rush_hpc.rsh(network=network, url=url, secret=SECRET, worker_address=f"{bridge}:{port}")
        yield controller, local_port, port
        controller.reset()
        controller.close()
    finally:
        tunnel.terminate()
        tunnel.wait(10)
        stop(process)


def test_a_controller_behind_an_ssh_tunnel_gives_the_workers_the_address_they_reach(tunnelled, login_env,
                                                                                    tmp_path):
    controller, tunnel_port, redis_port = tunnelled
    ids = controller.start_sbatch_workers(wl_random_search, n_workers=1, globals={"rush_n_tasks": 20},
                                          log_dir=str(tmp_path / "tunnel"), **login_env,
                                          **{**SLURM, "partition": "multi"})
    controller.wait_for_workers(worker_ids=ids, timeout=60)
    wait_until(lambda: set(controller.worker_ids(state="terminated")) == set(ids), 60, what="the worker to end")
    assert controller.n_finished_tasks >= 20
    assert set(controller.worker_info.node) <= set(os.environ["RUSH_TEST_SLURM_MULTI"].split(","))
    assert controller.config.port == tunnel_port and controller.worker_config.port == redis_port
    assert controller.worker_config.password == controller.config.password
