"""Redis Cluster: a real 3-master cluster (redis-server --cluster-enabled, redis-cli --cluster create).

A network lives in one hash slot (its keys share the ``{network}`` hash tag), so on one master; many
networks spread across the masters. ``redis+cluster://<any node>`` reaches all of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import redis

import rush_hpc

from conftest import SECRET, wait_until
from test_ownership import assert_invariants, pid_of, wl_pop_forever

FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory):
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert binary and cli, "redis-server / redis-cli are not installed; run scripts/test"
    directory = tmp_path_factory.mktemp("cluster")
    ports = cluster_node_ports(3)
    processes = [subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(directory / f"redis-{port}.log")],
        stdin=subprocess.DEVNULL) for port in ports]
    try:
        for port in ports:
            wait_until(lambda port=port: _pings(port), timeout=10, what=f"cluster node {port}")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(lambda: all(_cluster_ok(p) for p in ports), timeout=30, what="cluster_state:ok")
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def cluster_node_ports(n: int) -> list[int]:
    """Free ports below 55536 whose cluster bus port (+10000) is free too."""
    import random
    import socket

    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    return redis.Redis(port=port).cluster("info").get("cluster_state") == "ok"


def networks_on_every_master(client: redis.cluster.RedisCluster, n_masters: int) -> list[str]:
    """Network names whose slots live on different masters."""
    found: dict[str, str] = {}
    for i in range(1000):
        name = f"cl-{i}"
        node = client.get_node_from_key(f"rush:{{{name}}}:x").name
        found.setdefault(node, name)
        if len(found) == n_masters:
            break
    return list(found.values())


def test_the_vignette_heartbeats_and_reset_on_a_cluster(cluster_ports):
    url = f"redis+cluster://127.0.0.1:{cluster_ports[1]}"
    probe = rush_hpc.RedisConfig.from_url(url).client()
    names = networks_on_every_master(probe, 3)
    assert len(names) == 3
    controllers = []
    try:
        for name in names:  # one network per master, each reached through the same single URL
            rush = rush_hpc.rsh(network=name, url=url, secret=SECRET)
            controllers.append(rush)
            keys = rush.push_tasks([{"x": i, "sleep": 0.01} for i in range(30)], max_retries=1)
            ids = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=2, **FAST)
            rush.wait_for_workers(worker_ids=ids)
            rush.wait_for_tasks(keys, timeout=60)
            assert sorted(rush.fetch_finished_tasks()["y"]) == list(range(30))
            assert_invariants(rush, 30)
        # heartbeat loss on a cluster: a frozen worker is found lost and its task requeued
        rush = controllers[0]
        [key] = rush.push_tasks([{"x": 99, "sleep": 30}], max_retries=1)
        wait_until(lambda: rush.task_states(key)[key] == "running", what="the long task to run")
        holder = rush.fetch_running_tasks()["worker_id"][0]
        pid = pid_of(rush, holder)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: holder in rush.detect_lost_workers(), timeout=10, poll=0.1, what="lost")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert rush.worker_info.set_index("worker_id").loc[holder, "state"] == "lost"
        assert rush.task_states(key)[key] in ("queued", "running")  # requeued (and maybe popped again)
        for controller in controllers:
            controller.reset()
            assert not list(probe.scan_iter(match=controller.keys.pattern))
    finally:
        for controller in controllers:
            controller.close()
