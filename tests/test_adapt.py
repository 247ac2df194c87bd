"""Elastic workers on real local workers: rise with the queue, drain, idle ones end, the lost are
replaced, failing starts stop the policy with an error."""

from __future__ import annotations

import os
import signal
import time

import pytest

import rush_hpc

from rush_hpc.exceptions import NoWorkersError

from conftest import wait_until
from loops import wl_queue_slow as wl_queue

FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}


def test_adapt_rises_with_the_queue_drains_and_shrinks(rush):
    keys = rush.push_tasks([{"x": i, "sleep": 0.05} for i in range(200)])
    rush.adapt(0, 6, worker_loop=wl_queue, interval=0.3, idle_timeout=1.0, **FAST)
    peak = 0
    deadline = time.monotonic() + 90
    while rush.n_finished_tasks < 200 and time.monotonic() < deadline:
        alive = len(rush._ids_in_state("running", "launched"))
        peak = max(peak, alive)
        assert alive <= 6  # never more than maximum, starting ones included
        time.sleep(0.1)
    rush.wait_for_tasks(keys, timeout=30)
    assert peak >= 2
    status = rush.adapt_status()
    assert status["status"] == "running" and status["maximum"] == "6"
    wait_until(lambda: not rush._ids_in_state("running", "launched"), timeout=30, what="idle workers to end")
    assert set(rush.worker_info["state"]) == {"terminated"}
    assert int(rush.adapt_status()["started"]) <= 6 + 2  # no flood of starts
    rush.adapt(None)


def test_a_worker_killed_under_adapt_is_replaced(rush):
    rush.adapt(2, 2, worker_loop=wl_queue, interval=0.3, idle_timeout=60, **FAST)
    wait_until(lambda: len(rush.running_worker_ids) == 2, timeout=30, what="two workers")
    victim = rush.running_worker_ids[0]
    os.kill(int(rush.worker_info.set_index("worker_id").loc[victim, "pid"]), signal.SIGKILL)
    wait_until(lambda: victim not in rush.running_worker_ids and len(rush.running_worker_ids) == 2,
               timeout=30, what="a replacement")
    assert rush.worker_info.set_index("worker_id").loc[victim, "state"] == "lost"
    rush.stop_workers()  # also stops the policy
    assert rush.adapt_status()["status"] == "stopped"


def test_failing_starts_stop_adapt_with_an_error(rush, tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no such environment' >&2\nexit 3\n")
    broken.chmod(0o755)
    rush.push_tasks([{"x": 1, "sleep": 0.01}])
    rush.adapt(0, 4, worker_loop=wl_queue, interval=0.2, idle_timeout=60, max_start_failures=3,
               python=str(broken), **FAST)
    wait_until(lambda: rush.adapt_status().get("status") == "error", timeout=60, what="adapt to give up")
    status = rush.adapt_status()
    assert "3 worker starts failed in a row" in status["error"]
    assert int(status["started"]) <= 12  # a few tries, not a loop
    # every worker it started failed: the wait says so at once, with the policy's error
    with pytest.raises(NoWorkersError, match=r"policy has stopped \(adapt stopped: 3 worker starts failed"):
        rush.wait_for_tasks(rush.fetch_tasks()["keys"].tolist(), timeout=30)


def test_status_shows_the_policy_to_another_process(rush, redis_config):
    import subprocess
    import sys

    rush.adapt(1, 3, worker_loop=wl_queue, interval=0.3, idle_timeout=60, **FAST)
    wait_until(lambda: rush.adapt_status().get("alive") == "1", timeout=30, what="one worker alive")
    env = {**os.environ, "RUSH_HPC_URL": redis_config.to_url(show_secrets=True), "RUSH_HPC_NETWORK": rush.network}
    out = subprocess.run([sys.executable, "-m", "rush_hpc", "status"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "* Adapt: running (local, 1..3 workers, 1 alive" in out.stdout
    rush.adapt(None)


def test_workers_being_started_are_not_judged_from_their_half_written_record(rush, caplog):
    """A launcher that takes its time (sbatch over SSH): meanwhile the policy thread's lost-worker
    checks see a record with a launcher name but no job id yet. They must neither warn about it
    ("not acting on its record") nor call it lost."""
    import threading

    from rush_hpc.launchers.base import WorkerCommand
    from rush_hpc.launchers.slurm import SbatchHandle
    from rush_hpc.launchers.sbatch import SbatchLauncher

    entered, release = threading.Event(), threading.Event()

    class SlowLauncher(SbatchLauncher):
        def start(self, worker_ids, command):
            entered.set()
            release.wait(10)
            handles = [SbatchHandle(w, "999999_0") for w in worker_ids]
            self.handles.update({h.worker_id: h for h in handles})
            return handles

    launcher = SlowLauncher("/tmp")
    starter = threading.Thread(target=rush.start_workers, args=(launcher, 2, WorkerCommand(rush.network, "python")))
    starter.start()
    assert entered.wait(10)
    caplog.set_level("WARNING")
    assert rush.detect_lost_workers() == []
    assert len(rush._ids_in_state("launched")) == 2
    release.set()
    starter.join(10)
    assert "not acting on its record" not in caplog.text


def test_a_wait_outlives_a_gap_between_workers_while_adapt_runs(rush):
    """All workers ended (a walltime, a replacement still in the scheduler's queue): while an adapt
    policy is alive the wait goes on; once it stopped, or its state in Redis went stale, it raises."""
    import time as clock

    from rush_hpc.states import WorkerState, set_worker_state

    set_worker_state(rush, "w-ended", WorkerState.LAUNCHED, worker_id="w-ended")
    set_worker_state(rush, "w-ended", WorkerState.RUNNING, (WorkerState.LAUNCHED.value,))
    set_worker_state(rush, "w-ended", WorkerState.TERMINATED, (WorkerState.RUNNING.value,))
    keys = rush.push_tasks([{"x": 1}])
    rush.redis.hset(rush.keys.adapt, mapping={"status": "running", "interval": "1", "updated_at": f"{clock.time():.3f}"})
    with pytest.raises(rush_hpc.RushTimeoutError):
        rush.wait_for_tasks(keys, timeout=1.5)  # no NoWorkersError: the policy will start workers
    rush.redis.hset(rush.keys.adapt, "updated_at", f"{clock.time() - 60:.3f}")  # its controller is gone
    with pytest.raises(NoWorkersError):
        rush.wait_for_tasks(keys, timeout=5)
