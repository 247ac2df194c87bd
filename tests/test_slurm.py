"""SLURM launchers against the real cluster of scripts/test-cluster (accounting on): partition
"debug" is this machine; partition "multi" is two nodes in network namespaces (placement across
nodes, a node failure)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

import rush_hpc
from rush_hpc.config import RedisConfig
from rush_hpc.examples.random_search import wl_random_search
from rush_hpc import WorkerStartError

from loops import wl_hold, wl_queue_slow
from conftest import SECRET, require_cluster, start_redis_server, stop, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slurm
SLURM = {"partition": "debug", "time": 5, "heartbeat_period": 0.5, "heartbeat_expire": 3.0}
MULTI_NODES = [n for n in os.environ.get("RUSH_TEST_SLURM_MULTI", "").split(",") if n]
PASSWORD = "slurm-multi-redis-pw-91c2"


@pytest.fixture(scope="module")
def slurm_cluster():
    ok = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True, timeout=20
    ).stdout.strip() in ("idle", "mix", "alloc")
    require_cluster("SLURM cluster", ok, "sinfo does not show an up node (SLURM_CONF unset?)")
    ok = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=20).returncode == 0
    require_cluster("SLURM accounting", ok, "sacct fails: slurmdbd not running")


@pytest.fixture
def slurm_rush(slurm_cluster, rush):
    return rush


@pytest.fixture
def log_dir(tmp_path):
    return str(tmp_path / "logs")


SEARCH = {"rush_n_tasks": 100}  # globals of the vignette loop from rush_hpc.examples


def wl_hold_task(rush):
    """Task 0 of the array honours terminate (finishes its task); the others ignore it."""
    import os

    key = rush.push_running_tasks([{"x": os.environ.get("SLURM_ARRAY_TASK_ID", "?")}])
    while True:
        if rush.terminated and os.environ.get("SLURM_ARRAY_TASK_ID") == "0":
            rush.push_results(key, [{"y": "finished before the time limit"}])
            return
        time.sleep(0.1)


def _check_random_search(rush, ids, launcher):
    rush.wait_for_workers(worker_ids=ids, timeout=60)
    for worker in rush._worker_hashes(ids).values():  # no secret in what was submitted
        for path in [worker.get("job_script")] + list(Path(worker["stdout"]).parent.glob("*.sh")):
            if path:
                assert SECRET.decode() not in Path(path).read_text()
    info = rush.worker_info.set_index("worker_id").loc[ids]
    assert (info.launcher == launcher).all()
    assert all("_" in j for j in info.job_id) and info.node.notna().all()
    wait_until(lambda: set(rush.worker_ids(state="terminated")) == set(ids), 60, what="workers to end")
    assert rush.n_finished_tasks >= 100 and rush.n_running_tasks == 0


def test_random_search_with_four_submitit_workers(slurm_rush, log_dir):
    ids = slurm_rush.start_slurm_workers(wl_random_search, n_workers=4, globals=SEARCH,
                                         log_dir=log_dir, **SLURM)
    _check_random_search(slurm_rush, ids, "slurm")
    assert len({j.split("_")[0] for j in slurm_rush.worker_info.job_id}) == 1  # one array


def test_random_search_with_four_sbatch_workers(slurm_rush, log_dir):
    ids = slurm_rush.start_sbatch_workers(wl_random_search, n_workers=4, globals=SEARCH,
                                          log_dir=log_dir, **SLURM)
    _check_random_search(slurm_rush, ids, "sbatch")


def test_nasty_log_dir_survives_the_job_script(slurm_rush, tmp_path):
    nasty = tmp_path / "a \"0\" it's; echo foo"
    ids = slurm_rush.start_sbatch_workers(wl_random_search, n_workers=1, globals=SEARCH,
                                          log_dir=str(nasty), **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    assert list(nasty.glob("rush-*-0.err"))


def test_scancel_of_one_worker_makes_it_lost_with_reason_cancelled(slurm_rush, log_dir):
    slurm_rush.push_tasks([{"x": 1}] * 2, max_retries=0)
    def loop(rush):
        while not rush.terminated:
            task = rush.pop_task(timeout=0.1)
            if task is not None:
                time.sleep(60)

    ids = slurm_rush.start_slurm_workers(loop, n_workers=2, log_dir=log_dir, **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    wait_until(lambda: slurm_rush.n_running_tasks == 2, 20, what="tasks to run")
    victim = ids[0]
    job = slurm_rush.worker_info.set_index("worker_id").loc[victim, "job_id"]
    subprocess.run(["scancel", job], check=True)
    lost = wait_until(slurm_rush.detect_lost_workers, 30, poll=0.5, what="lost worker")
    assert lost == [victim]
    assert "CANCELLED" in slurm_rush.worker_info.set_index("worker_id").loc[victim, "reason"]
    failed = slurm_rush.fetch_failed_tasks()
    assert len(failed) == 1 and "CANCELLED" in failed["message"][0]
    slurm_rush.stop_workers(type="kill")
    other_job = slurm_rush.worker_info.set_index("worker_id").loc[ids[1], "job_id"]
    assert slurm_rush.worker_info.set_index("worker_id").loc[ids[1], "state"] == "killed"
    wait_until(lambda: subprocess.run(["squeue", "-h", "-j", other_job], capture_output=True,
                                      text=True).stdout.strip() == "", 30, poll=0.5, what="the job to end")


def test_time_limit_signal_ends_cleanly_and_timeout_is_the_reason_when_killed(slurm_rush, log_dir):
    ids = slurm_rush.start_sbatch_workers(wl_hold_task, n_workers=2, log_dir=log_dir,
                                          **{**SLURM, "time": 1, "signal_delay_s": 50})
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    info = slurm_rush.worker_info.set_index("job_id")
    honours = info.loc[[j for j in info.index if j.endswith("_0")][0], "worker_id"]
    ignores = info.loc[[j for j in info.index if j.endswith("_1")][0], "worker_id"]
    # the signal comes 50 s before the 1-minute limit: the honouring worker ends cleanly
    wait_until(lambda: honours in slurm_rush.worker_ids(state="terminated"), 45, poll=0.5, what="clean end")
    assert slurm_rush.fetch_finished_tasks()["y"].tolist() == ["finished before the time limit"]
    # the other one is killed at the limit: lost with reason TIMEOUT, its task failed with it
    wait_until(lambda: ignores in slurm_rush.detect_lost_workers() or ignores in slurm_rush.worker_ids(state="lost"),
               150, poll=1.0, what="TIMEOUT")
    reason = slurm_rush.worker_info.set_index("worker_id").loc[ignores, "reason"]
    assert "TIMEOUT" in reason or "heartbeat" in reason
    if "heartbeat" in reason:  # heartbeat may win the race; the scheduler must still say TIMEOUT
        job = info.index[info.worker_id == ignores][0]
        wait_until(lambda: "TIMEOUT" in subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
                                                       capture_output=True, text=True).stdout, 30, poll=1)
    assert slurm_rush.n_running_tasks == 0 and slurm_rush.n_failed_tasks == 1


def test_job_whose_setup_fails_is_reported_with_its_stderr(slurm_rush, log_dir):
    slurm_rush.start_sbatch_workers(wl_random_search, n_workers=1, log_dir=log_dir,
                                    setup=["no_such_setup_command --flag"], **SLURM)
    with pytest.raises(WorkerStartError, match="(?s)FAILED before registering.*no_such_setup_command"):
        slurm_rush.wait_for_workers(1, timeout=60)


def test_cancelling_a_worker_that_ended_cleanly_is_recorded(slurm_rush, log_dir):
    def loop(rush):
        while not rush.terminated:
            time.sleep(0.05)

    ids = slurm_rush.start_sbatch_workers(loop, n_workers=1, log_dir=log_dir, **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    slurm_rush.stop_workers(type="kill")  # the worker answers the kill message; its job is cancelled anyway
    worker = slurm_rush._worker_hashes(ids)[ids[0]]
    assert worker["state"] == "killed" and float(worker["cancelled_at"]) > float(worker["started_at"])
    wait_until(lambda: (slurm_rush.detect_lost_workers() or True)
               and slurm_rush._worker_hashes(ids)[ids[0]].get("job_state"), 30, poll=0.5, what="job_state")
    # the scheduler's final word is joined to the worker (the worker may exit on the kill message first)
    assert slurm_rush._worker_hashes(ids)[ids[0]]["job_state"] in ("CANCELLED", "COMPLETED", "FAILED")


def test_submitit_setup_runs_under_set_e(slurm_rush, log_dir):
    slurm_rush.start_slurm_workers(wl_random_search, n_workers=1, log_dir=log_dir,
                                   setup=["false", "echo setup went on"], **SLURM)
    with pytest.raises(WorkerStartError, match="(?s)FAILED before registering"):
        slurm_rush.wait_for_workers(1, timeout=60)


def test_a_pending_reason_that_never_clears_is_reported_at_once(slurm_rush, log_dir, multi_nodes):
    started = time.monotonic()
    ids = slurm_rush.start_sbatch_workers(wl_random_search, n_workers=2, log_dir=log_dir,
                                          **{**SLURM, "partition": "multi", "time": 120})  # MaxTime=30
    with pytest.raises(WorkerStartError, match=r"(?s)SLURM job \d+_[01] is pending for reason "
                                               r"PartitionTimeLimit.*shorter time="):
        slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    assert time.monotonic() - started < 20


# -- several nodes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_nodes(slurm_cluster):
    up = len(MULTI_NODES) >= 2 and all(
        subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True,
                       timeout=20).stdout.strip() in ("idle", "mix", "alloc") for node in MULTI_NODES)
    require_cluster("multi-node SLURM partition", up, "RUSH_TEST_SLURM_MULTI unset or its nodes not idle")
    return MULTI_NODES


@pytest.fixture(scope="module")
def bridge_redis(multi_nodes, tmp_path_factory):
    """Jobs on the namespace nodes reach the controller's Redis on the bridge address."""
    bridge = os.environ["RUSH_TEST_BRIDGE_IP"]
    process, port = start_redis_server(tmp_path_factory.mktemp("redis-multi"), "--bind", "127.0.0.1", bridge,
                                       "--requirepass", PASSWORD)
    yield RedisConfig(host=bridge, port=port, password=PASSWORD)
    stop(process)


@pytest.fixture
def mrush(bridge_redis, network):
    controller = rush_hpc.rsh(network=network, config=bridge_redis, secret=SECRET)
    yield controller
    controller.reset()
    controller.close()


MULTI = {"partition": "multi", "time": 5, "heartbeat_period": 0.5}


def test_workers_spread_over_two_nodes(mrush, multi_nodes, log_dir):
    # 2 CPUs per worker, 4 per node: 4 workers need both nodes
    ids = mrush.start_sbatch_workers(wl_hold, n_workers=4, log_dir=log_dir, cpus_per_worker=2,
                                     heartbeat_expire=5.0, **MULTI)
    mrush.wait_for_workers(worker_ids=ids, timeout=60)
    info = mrush.worker_info.set_index("worker_id").loc[ids]
    assert sorted(info.node.value_counts().to_dict().items()) == [(n, 2) for n in sorted(multi_nodes)]
    assert set(info.hostname) == set(multi_nodes)  # each node is its own host (UTS namespace)
    mrush.stop_workers(type="terminate")
    wait_until(lambda: set(mrush.worker_ids(state="terminated")) == set(ids), 30, what="workers to end")
    assert mrush.n_finished_tasks == 4


def test_node_failure_loses_its_workers_with_node_fail_and_cancels_the_requeued_job(
        mrush, bridge_redis, multi_nodes, log_dir):
    victim_node = multi_nodes[1]
    ids = mrush.start_sbatch_workers(wl_hold, n_workers=2, log_dir=log_dir, cpus_per_worker=4,
                                     heartbeat_expire=120.0, **MULTI)  # the scheduler must tell, not the heartbeat
    mrush.wait_for_workers(worker_ids=ids, timeout=60)
    info = mrush.worker_info.set_index("worker_id")
    victim = info.index[info.node == victim_node][0]
    job = info.loc[victim, "job_id"]
    subprocess.run(["ip", "-n", victim_node, "link", "set", "eth0", "down"], check=True)
    try:
        # a second controller (no handles in memory) sees it through validated handles and ONE sacct
        second = rush_hpc.rsh(network=mrush.network, config=bridge_redis, secret=SECRET)
        lost = wait_until(second.detect_lost_workers, 60, poll=1.0, what="NODE_FAIL")
        second.close()
        assert lost == [victim]
        worker = mrush._worker_hashes([victim])[victim]
        assert worker["state"] == "lost" and "NODE_FAIL" in worker["reason"], worker["reason"]
        assert "NODE_FAIL" in mrush.fetch_running_tasks().to_string() or mrush.n_failed_tasks == 1
        # SLURM requeued the job; the controller cancelled it, so it will not start a worker later
        wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True
                                          ).stdout.strip() == "", 30, poll=0.5, what="the requeued job to go")
        def records() -> list[str]:
            return subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                                  text=True).stdout.split("\n")

        wait_until(lambda: len(records()) > 2, 10, poll=0.5, what="the requeued record in sacct")
        assert records()[0] == "NODE_FAIL" and records()[1].startswith("CANCELLED"), records()
    finally:
        subprocess.run(["ip", "-n", victim_node, "link", "set", "eth0", "up"], check=True)
    # the node comes back (ReturnToService=2) for the tests that follow
    wait_until(lambda: subprocess.run(["sinfo", "-h", "-n", victim_node, "-o", "%t"], capture_output=True,
                                      text=True).stdout.strip() in ("idle", "mix", "alloc"), 60, poll=1.0,
               what=f"{victim_node} back")


def test_rush_hpc_stop_kill_from_another_process_cancels_the_job(slurm_rush, log_dir):
    """A second controller (the CLI) rebuilds the SLURM handle from the worker's record (validated
    job id) and cancels the job; it records the cancel."""
    ids = slurm_rush.start_sbatch_workers(wl_hold, n_workers=1, log_dir=log_dir, **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    job = slurm_rush._worker_hashes(ids)[ids[0]]["job_id"]
    env = {**os.environ, "RUSH_HPC_URL": slurm_rush.config.to_url(show_secrets=True),
           "RUSH_HPC_NETWORK": slurm_rush.network, "RUSH_HPC_SECRET": SECRET.decode()}
    result = subprocess.run([sys.executable, "-m", "rush_hpc", "stop", "--kill"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    worker = slurm_rush._worker_hashes(ids)[ids[0]]
    assert worker["state"] == "killed" and worker.get("cancelled_at")
    wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True
                                      ).stdout.strip() == "", 30, poll=0.5, what="the job to go")


def wl_fast_queue(rush):
    """A fast queue loop that ignores walltime itself: only pop_task stands between it and overrunning."""
    while True:
        task = rush.pop_task(timeout=0.5)
        if task is None:
            if rush.terminated:
                return
            continue
        time.sleep(0.1)
        rush.push_results(task.key, [{"y": 1}])


def test_a_fast_loop_overrunning_a_one_minute_walltime_loses_nothing(slurm_rush, log_dir):
    """Issue 10: SLURM walltime overrun (--time=1) with a fast loop: the worker stops taking tasks
    near its end (15 s before a 1-minute limit) and ends terminated with reason walltime; no task is
    left running or finished twice, the rest stays queued."""
    keys = slurm_rush.push_tasks([{"x": i} for i in range(2000)], max_retries=1)
    [worker_id] = slurm_rush.start_sbatch_workers(wl_fast_queue, n_workers=1, log_dir=log_dir,
                                                  **{**SLURM, "time": 1})
    slurm_rush.wait_for_workers(worker_ids=[worker_id], timeout=60)
    wait_until(lambda: worker_id not in slurm_rush.worker_ids(state="running"), 90, poll=1.0,
               what="the worker to end")
    info = slurm_rush.worker_info.set_index("worker_id").loc[worker_id]
    assert info["state"] == "terminated" and info["reason"] == "walltime", dict(info)
    states = slurm_rush.task_states(keys)
    assert "running" not in states.values()
    finished = slurm_rush.fetch_finished_tasks()["keys"]
    assert finished.is_unique and 0 < len(finished) < 2000
    assert list(states.values()).count("queued") == 2000 - len(finished)


def test_adapt_on_slurm_rises_drains_and_shrinks(slurm_rush, log_dir):
    """Issue 16: a queue of 200 tasks with adapt(0, 6) on SLURM: jobs pending in the scheduler count
    as alive (never more than 6), the queue drains, idle workers end."""
    keys = slurm_rush.push_tasks([{"x": i, "sleep": 0.1} for i in range(200)])
    slurm_rush.adapt(0, 6, launcher="sbatch", worker_loop=wl_queue_slow, interval=0.5, idle_timeout=3,
                     log_dir=log_dir, **SLURM)
    peak = 0
    deadline = time.monotonic() + 120
    while slurm_rush.n_finished_tasks < 200 and time.monotonic() < deadline:
        alive = len(slurm_rush.worker_ids(state=["running", "launched"]))
        peak = max(peak, alive)
        assert alive <= 6
        time.sleep(0.2)
    slurm_rush.wait_for_tasks(keys, timeout=60)
    assert peak >= 2
    wait_until(lambda: not slurm_rush.worker_ids(state=["running", "launched"]), 60, poll=0.5,
               what="idle SLURM workers to end")
    assert int(slurm_rush.adapt_status()["started"]) <= 8
    slurm_rush.adapt(None)


def test_adapt_replaces_walltime_ending_jobs_before_they_end(slurm_rush, log_dir):
    """Issue 16: 1-minute jobs under adapt(2, 2) and a longer search: a replacement job starts before
    the old one ends (lifetime_stagger), nothing is lost or left running."""
    keys = slurm_rush.push_tasks([{"x": i, "sleep": 0.25} for i in range(560)], max_retries=1)
    # no --signal: SLURM may send it up to 60 s early (its event resolution), i.e. at any time in a
    # 1-minute job; the workers end by their own walltime margin (15 s: a quarter of the job)
    slurm_rush.adapt(2, 2, launcher="sbatch", worker_loop=wl_queue_slow, interval=1.0, idle_timeout=60,
                     lifetime_stagger=30, log_dir=log_dir, **{**SLURM, "time": 1, "signal_delay_s": 0})
    slurm_rush.wait_for_tasks(keys, timeout=300)
    slurm_rush.adapt(None)
    info = slurm_rush.worker_info
    assert len(info) >= 4  # the first two jobs were replaced
    first_ids = info.sort_values("started_at").worker_id.iloc[:2].tolist()
    wait_until(lambda: not set(first_ids) & set(slurm_rush.worker_ids(state=["running", "launched"])), 90,
               poll=1, what="the first two 1-minute jobs to end")  # the queue may drain before they do
    info = slurm_rush.worker_info
    first = info.sort_values("started_at").iloc[:2]
    later = info.sort_values("started_at").iloc[2:]
    # ended by their walltime margin, or (idle near their end, no longer taking tasks) asked to
    # terminate by adapt once their replacements ran
    assert set(first["state"]) == {"terminated"} and set(first["reason"].fillna("adapt")) <= {"walltime", "adapt"}
    first_end = first["ended_at"].min()
    assert later["started_at"].min() < first_end  # a replacement was running before the first ended
    assert slurm_rush.n_running_tasks == 0 and slurm_rush.n_failed_tasks == 0
    assert slurm_rush.fetch_finished_tasks()["keys"].is_unique


def _squeue(array: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i"], capture_output=True,
                          text=True).stdout.split()


def test_two_workers_per_sbatch_job_share_it_and_one_is_killed_alone(slurm_rush, log_dir):
    import psutil

    from loops import wl_until_terminated

    ids = slurm_rush.start_sbatch_workers(wl_until_terminated, n_workers=4, workers_per_job=2, log_dir=log_dir,
                                          **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    info = slurm_rush.worker_info.set_index("worker_id").loc[ids]
    jobs = sorted(set(info.job_id))
    assert len(jobs) == 2 and sorted(_squeue(jobs[0].split("_")[0])) == jobs  # 4 workers, 2 jobs
    by_job = {job: list(info.index[info.job_id == job]) for job in jobs}
    assert all(len(members) == 2 for members in by_job.values())
    # partition "debug" is this machine: each job is ONE interpreter that forked its two workers
    for members in by_job.values():
        parents = {psutil.Process(int(info.loc[w, "pid"])).ppid() for w in members}
        assert len(parents) == 1
    victim, sibling = by_job[jobs[0]]
    slurm_rush.stop_workers(type="kill", worker_ids=[victim])
    time.sleep(2 * SLURM["heartbeat_expire"])
    assert slurm_rush.detect_lost_workers() == []
    assert sorted(slurm_rush.worker_ids(state="running")) == sorted(set(ids) - {victim})
    assert jobs[0] in _squeue(jobs[0].split("_")[0])  # the shared job was not cancelled
    slurm_rush.stop_workers(type="terminate")
    wait_until(lambda: set(slurm_rush.worker_ids(state="terminated")) == set(ids) - {victim}, 30, poll=0.5,
               what="the others to terminate")
    wait_until(lambda: _squeue(jobs[0].split("_")[0]) == [], 30, poll=0.5, what="both jobs to end")


def test_two_workers_per_submitit_job(slurm_rush, log_dir):
    from loops import wl_until_terminated

    ids = slurm_rush.start_slurm_workers(wl_until_terminated, n_workers=2, workers_per_job=2, log_dir=log_dir,
                                         **SLURM)
    slurm_rush.wait_for_workers(worker_ids=ids, timeout=60)
    info = slurm_rush.worker_info.set_index("worker_id").loc[ids]
    assert len(set(info.job_id)) == 1 and len(set(info.pid)) == 2
    job = info.job_id.iloc[0]
    cpus = subprocess.run(["squeue", "-h", "-j", job, "-o", "%C"], capture_output=True, text=True).stdout.strip()
    assert cpus == "2"
    slurm_rush.stop_workers(type="kill")  # every worker of the job ended: now it is cancelled
    wait_until(lambda: _squeue(job.split("_")[0]) == [], 30, poll=0.5, what="the job to end")
    assert set(slurm_rush.worker_ids(state="killed")) == set(ids)
