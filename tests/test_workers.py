"""Local workers as real processes: bootstrap, heartbeat, lost detection, stop, logs, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import numpy as np
import pytest

import rush_hpc
from rush_hpc import PayloadError, RushTimeoutError, WorkerStartError
from rush_hpc.examples import branin
from rush_hpc.states import WorkerState

from conftest import SECRET, wait_until
from loops import FAST, wl_queue_slow, wl_raises, wl_random_search, wl_until_terminated

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable on workers

def test_random_search_with_four_local_workers(rush):
    ids = rush.start_local_workers(worker_loop=wl_random_search, n_workers=4,
                                   globals={"branin": branin}, **FAST)
    rush.wait_for_workers(4, timeout=30)
    wait_until(lambda: set(rush.worker_ids(state="terminated")) == set(ids), 30, what="workers to end")
    frame = rush.fetch_finished_tasks()
    assert len(frame) >= 100 and frame["y"].min() < 5
    assert set(frame["worker_id"]) <= set(ids) and {"x1", "x2", "y", "pid", "keys"} <= set(frame.columns)
    info = rush.worker_info.set_index("worker_id")
    assert (info.loc[ids, "launcher"] == "local").all() and info.loc[ids, "pid"].notna().all()
    assert rush.n_running_tasks == 0


def test_globals_given_as_names_are_looked_up_in_the_caller(rush):
    limit = 3

    def loop(rush):
        for i in range(limit):
            rush.push_results(rush.push_running_tasks([{"i": i}]), [{"y": helper(i)}])

    helper = abs  # noqa: F841 - found by name
    ids = rush.start_local_workers(worker_loop=loop, n_workers=1, globals=["limit", "helper"], **FAST)
    wait_until(lambda: rush.worker_ids(state="terminated") == ids, 30, what="worker to end")
    assert rush.n_finished_tasks == 3
    with pytest.raises(rush_hpc.ConfigError, match="'nope' is not defined"):
        rush.start_local_workers(worker_loop=loop, globals=["nope"])


def _kill_midtask(rush, max_retries: int):
    rush.push_tasks([{"sleep": 30}], max_retries=max_retries)
    ids = rush.start_local_workers(worker_loop=wl_queue_slow, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    wait_until(lambda: rush.n_running_tasks == 1, 10, what="the task to run")
    pid = int(rush.worker_info.set_index("worker_id").loc[ids[0], "pid"])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    lost = wait_until(rush.detect_lost_workers, 5, what="lost worker")
    return ids, lost, time.monotonic() - killed_at


def test_sigkill_mid_task_is_detected_and_the_task_fails_with_the_reason(rush):
    ids, lost, elapsed = _kill_midtask(rush, max_retries=0)
    assert lost == ids and elapsed <= FAST["heartbeat_expire"] + 1
    info = rush.worker_info.set_index("worker_id").loc[ids[0]]
    assert info.state == "lost" and "SIGKILL" in info.reason
    failed = rush.fetch_failed_tasks()
    assert len(failed) == 1 and "lost" in failed["message"][0] and "SIGKILL" in failed["message"][0]
    assert rush.n_running_tasks == 0


def test_lost_task_with_retries_is_requeued_and_finished_by_another_worker(rush):
    ids, lost, _ = _kill_midtask(rush, max_retries=1)
    assert lost == ids and rush.n_failed_tasks == 0
    assert rush.fetch_tasks_with_state(["queued"])["sleep"].tolist() == [30]
    # a fast worker picks the requeued task up; shorten its evaluation by rewriting the inputs
    key = rush.fetch_queued_tasks()["keys"][0]
    rush.redis.hset(rush.keys.task(key), "xs", rush.codec.encode({"sleep": 0.01}))
    rush.start_local_workers(worker_loop=wl_queue_slow, n_workers=1, **FAST)
    rush.wait_for_tasks([key], timeout=30)
    assert rush.task_states(key) == {key: "finished"}


def test_frozen_worker_is_lost_by_heartbeat_and_exits_when_it_wakes_up(rush):
    rush.push_tasks([{"sleep": 30}])
    ids = rush.start_local_workers(worker_loop=wl_queue_slow, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    wait_until(lambda: rush.n_running_tasks == 1, 10, what="the task to run")
    pid = int(rush.worker_info.set_index("worker_id").loc[ids[0], "pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        lost = wait_until(rush.detect_lost_workers, FAST["heartbeat_expire"] + 1, what="lost worker")
        assert lost == ids
        assert "heartbeat expired" in rush.worker_info.set_index("worker_id").loc[ids[0], "reason"]
        assert rush.n_failed_tasks == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    process = rush._supervisor.handles[ids[0]].process
    assert process.wait(10) == -signal.SIGKILL  # its heartbeat learned it was lost and ended it


def test_terminate_is_graceful(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST)
    rush.wait_for_workers(2, timeout=30)
    rush.stop_workers(type="terminate")
    wait_until(lambda: set(rush.worker_ids(state="terminated")) == set(ids), 10, what="terminated")
    assert rush.n_running_workers == 0


def test_kill_stops_the_process_and_fails_its_task(rush):
    rush.push_tasks([{"sleep": 30}])
    ids = rush.start_local_workers(worker_loop=wl_queue_slow, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    wait_until(lambda: rush.n_running_tasks == 1, 10, what="the task to run")
    rush.stop_workers(type="kill", worker_ids=ids)
    process = rush._supervisor.handles[ids[0]].process
    assert process.poll() is not None
    info = rush.worker_info.set_index("worker_id").loc[ids[0]]
    assert info.state == "killed"
    assert "killed by the controller" in rush.fetch_failed_tasks()["message"][0]


def test_loop_that_raises_marks_the_worker_failed_with_traceback(rush):
    ids = rush.start_local_workers(worker_loop=wl_raises, n_workers=1, **FAST)
    wait_until(lambda: rush.worker_ids(state="failed") == ids, 30, what="failed worker")
    info = rush.worker_info.set_index("worker_id").loc[ids[0]]
    assert "objective exploded" in info.reason
    assert "ValueError" in rush.redis.hget(rush.keys.worker(ids[0]), "traceback").decode()
    wait_until(lambda: "objective exploded" in " ".join(rush.read_log(ids)["message"]), 10, what="the log record")
    assert "objective exploded" in rush.fetch_failed_tasks()["message"][0]  # nothing left running


def test_unpicklable_globals_fail_at_start(rush):
    import threading

    with pytest.raises(PayloadError, match="cannot serialize global 'lock'"):
        rush.start_local_workers(worker_loop=wl_until_terminated, globals={"lock": threading.Lock()})
    assert rush.worker_ids == []


def test_fingerprint_mismatch_is_reported(rush, monkeypatch):
    from rush_hpc import payload

    real = payload.fingerprint()
    monkeypatch.setattr(payload, "fingerprint", lambda: {**real, "python": "3.1.0"})
    rush.start_local_workers(worker_loop=wl_until_terminated, **FAST)
    with pytest.raises(WorkerStartError, match=rf"worker has Python {real['python']}, controller 3.1.0"):
        rush.wait_for_workers(1, timeout=30)


def test_module_import_failure_is_shown_by_the_controller(rush):
    rush.start_local_workers(worker_loop=wl_until_terminated, modules=["no_such_module_xyz"], **FAST)
    with pytest.raises(WorkerStartError, match="could not import module 'no_such_module_xyz'"):
        rush.wait_for_workers(1, timeout=30)
    # the worker records its state first, then logs: the record may trail the state by a moment
    wait_until(lambda: "no_such_module_xyz" in " ".join(rush.read_log()["message"]), 10, what="the log record")


def test_worker_that_never_registers_is_reported_with_its_stderr(rush, tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'cannot load libpython3.so' >&2\nexit 3\n")
    broken.chmod(0o755)
    rush.start_local_workers(worker_loop=wl_until_terminated, python=str(broken), **FAST)
    with pytest.raises(WorkerStartError, match="(?s)exited with code 3 before registering.*libpython3"):
        rush.wait_for_workers(1, timeout=30)
    assert rush.worker_info["state"].tolist() == ["failed"]
    # the output is shown, never copied into Redis: the stored reason stays short
    assert rush.worker_info["reason"].tolist() == [f"process {rush.worker_info['pid'][0]} exited with code 3 "
                                                   "before registering"]


def test_wait_for_workers_timeout_lists_the_missing(rush):
    rush.store_worker_loop(wl_until_terminated)
    from rush_hpc.worker import set_worker_state

    set_worker_state(rush, "ghost", "launched", "", launcher="script")
    with pytest.raises(RushTimeoutError, match="(?s)only 0 of 1 workers registered.*ghost"):
        rush.wait_for_workers(worker_ids=["ghost"], timeout=0.3)


def test_logs_are_read_back(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(1, timeout=30)
    wait_until(lambda: "hello from the loop" in " ".join(rush.read_log()["message"]), 10, what="log record")
    log = rush.read_log()
    assert set(log["worker_id"]) == set(ids) and {"time", "level", "logger"} <= set(log.columns)
    rush.stop_workers()


def test_worker_script_starts_a_worker_from_a_shell(rush, tmp_path):
    line = rush.worker_script(worker_loop=wl_random_search, globals={"branin": branin},
                              python=sys.executable, credentials_file=str(tmp_path / "cred.json"))
    assert oct((tmp_path / "cred.json").stat().st_mode & 0o777) == "0o600"
    subprocess.run(line, shell=True, check=True, timeout=60)
    assert rush.n_finished_tasks >= 100
    assert rush.worker_info["launcher"].tolist() == ["script"]


def test_heartbeat_settings_are_validated(rush):
    with pytest.raises(rush_hpc.ConfigError, match="must be larger than its period"):
        rush.start_local_workers(worker_loop=wl_until_terminated, heartbeat_period=2, heartbeat_expire=1)


def test_monitor_detects_lost_workers_in_the_background(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(1, timeout=30)
    rush.start_monitor(interval=0.1)
    os.kill(int(rush.worker_info["pid"][0]), signal.SIGKILL)
    wait_until(lambda: rush.worker_ids(state="lost") == ids, 5, what="monitor")


def test_large_payload_spills_to_a_shared_directory(rush, tmp_path, monkeypatch):
    from rush_hpc import payload

    monkeypatch.setattr(payload, "DEFAULT_MAX_SIZE", 1000)
    blob = "x" * 5000
    with pytest.raises(PayloadError, match="more than the 0 MB limit for Redis. Pass payload_dir="):
        rush.start_local_workers(worker_loop=wl_until_terminated, globals={"blob": blob})

    def loop(rush):
        rush.push_results(rush.push_running_tasks([{"n": len(blob)}]), [{"y": 1}])

    ids = rush.start_local_workers(worker_loop=loop, globals={"blob": blob}, payload_dir=str(tmp_path), **FAST)
    wait_until(lambda: rush.worker_ids(state="terminated") == ids, 30, what="worker to end")
    assert rush.fetch_finished_tasks()["n"].tolist() == [5000]
    assert rush.redis.get(rush.keys.payload) == b"" and list(tmp_path.glob("rush-payload-*.pkl"))


def test_closing_a_controller_with_embedded_redis_kills_its_local_workers():
    rush = rush_hpc.rsh(network="embedded-close")
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, **FAST)
    rush.wait_for_workers(2, timeout=30)
    processes = [rush._supervisor.handles[w].process for w in ids]
    rush.close()
    assert all(p.poll() is not None for p in processes)


def test_priority_tasks_of_a_worker_that_ends_go_to_the_shared_queue(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    keys = rush.push_priority_tasks([{"x": 1}, {"x": 2}], priority=ids * 2)
    assert rush.n_queued_priority_tasks == 2
    rush.stop_workers(type="terminate")
    wait_until(lambda: rush.worker_ids(state="terminated") == ids, 10, what="terminated")
    assert rush.n_queued_priority_tasks == 0
    assert rush.fetch_queued_tasks()["keys"].tolist() == keys


def test_workers_without_heartbeat_still_terminate_and_are_found_lost_by_process(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=2, heartbeat_period=None)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    assert rush.redis.exists(rush.keys.heartbeat(ids[0])) == 0
    rush.stop_workers(type="terminate", worker_ids=ids[:1])
    wait_until(lambda: rush.worker_ids(state="terminated") == ids[:1], 10, what="terminated")
    os.kill(int(rush.worker_info.set_index("worker_id").loc[ids[1], "pid"]), signal.SIGKILL)
    assert wait_until(rush.detect_lost_workers, 5, what="lost") == ids[1:]


def test_dry_run_script_has_no_secrets(rush):
    script = rush.sbatch_script(n_workers=8, partition="debug")
    assert "#SBATCH --array=0-7" in script and SECRET.decode() not in script
    assert "RUSH_HPC_CREDENTIALS=" in script


def test_a_refused_start_leaves_no_worker_record(rush, tmp_path):
    with pytest.raises(rush_hpc.LaunchError, match="no-such-sbatch"):
        rush.start_sbatch_workers(wl_until_terminated, n_workers=2, log_dir=str(tmp_path),
                                  sbatch=str(tmp_path / "no-such-sbatch"))
    with pytest.raises(rush_hpc.ConfigError, match="extra_directives"):
        rush.start_sbatch_workers(wl_until_terminated, log_dir=str(tmp_path), extra_directives={"x\ny": 1})
    assert rush.worker_ids == [] and rush.worker_ids(state="launched") == [] and rush.worker_info.empty


def test_worker_ids_is_a_list_and_filters_by_state(rush):
    ids = rush.start_local_workers(worker_loop=wl_until_terminated, n_workers=np.int64(2), **FAST)
    rush.wait_for_workers(worker_ids=ids, timeout=30)
    assert rush.worker_ids == sorted(ids) and isinstance(rush.worker_ids, list)
    assert rush.worker_ids(state="running") == sorted(ids) == rush.worker_ids_in("running", "lost")
    assert rush.worker_ids(state=[WorkerState.TERMINATED]) == [] and rush.worker_ids() == sorted(ids)
    rush.stop_workers(type="terminate")
    wait_until(lambda: rush.worker_ids(state="terminated") == sorted(ids), 10, what="terminated")


def test_private_log_dir_is_removed_by_reset_and_close(redis_config, network):
    first = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    first.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    directory = first._log_dir
    assert directory is not None and list(directory.glob("*.err"))
    first.wait_for_workers(1, timeout=30)
    first.reset()
    assert not directory.exists()
    ids = first.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    directory = first._log_dir
    first.wait_for_workers(1, timeout=30)
    first.close()  # a worker still runs: it keeps its directory
    assert directory is not None and directory.exists()
    second = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    second.stop_workers(type="terminate")
    wait_until(lambda: second.worker_ids(state="terminated") == ids, 10, what="terminated")
    third = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    third.start_local_workers(worker_loop=wl_until_terminated, n_workers=1, **FAST)
    third_dir = third._log_dir
    third.wait_for_workers(worker_ids=third.worker_ids(state=["running", "launched"]), timeout=30)
    third.stop_workers(type="terminate")
    wait_until(lambda: not third.worker_ids(state="running"), 10, what="terminated")
    third.close()
    assert third_dir is not None and not third_dir.exists()
    second.reset()
    second.close()
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def test_starting_after_close_is_refused(redis_config, network):
    controller = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    controller.close()
    with pytest.raises(rush_hpc.RushError, match="is closed"):
        controller.start_local_workers(worker_loop=wl_until_terminated)


def test_local_workers_import_modules_next_to_the_controllers_script(redis_config, network, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mylib.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "sub" / "script.py").write_text(textwrap.dedent("""
        import sys, time
        import rush_hpc
        from mylib import double

        def loop(rush):
            import mylib
            rush.push_results(rush.push_running_tasks([{"x": 21}]), [{"y": mylib.double(21)}])

        rush = rush_hpc.rsh(network=sys.argv[1], url=sys.argv[2], secret=sys.argv[3])
        rush.start_local_workers(loop, n_workers=1, heartbeat_period=None)
        deadline = time.monotonic() + 30
        while rush.n_finished_tasks < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        print("y =", rush.fetch_finished_tasks()["y"].tolist(), double(1))
        rush.reset()
        rush.close()
    """))
    result = subprocess.run([sys.executable, "sub/script.py", network, redis_config.to_url(show_secrets=True),
                             SECRET.decode()], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "y = [42] 2" in result.stdout, result.stderr


def test_a_redis_writer_cannot_make_a_second_controller_kill_read_or_cancel(rush, redis_config, network, tmp_path):
    """Worker hashes forged by someone who can write Redis: pids of other processes (and pid 1),
    a job id that is an scancel option, a host we never used, paths of secret files."""
    import socket

    from rush_hpc.states import set_worker_state

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    secret_file = tmp_path / "credentials.json"
    secret_file.write_text("hunter2-the-redis-password")
    host = socket.gethostname()
    forged = {
        "a" * 32: {"launcher": "local", "host": host, "pid": str(victim.pid), "stderr": str(secret_file),
                   "stdout": str(secret_file)},
        "b" * 32: {"launcher": "local", "host": host, "pid": "1"},
        "c" * 32: {"launcher": "sbatch", "job_id": "--user=root", "stderr": str(secret_file)},
        "d" * 32: {"launcher": "ssh", "host": "root@attacker.example", "pid": "4242", "stdout": "/etc/shadow"},
    }
    try:
        for worker_id, info in forged.items():
            set_worker_state(rush, worker_id, "launched", **info)
        second = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
        with pytest.raises(WorkerStartError) as error:
            second.wait_for_workers(worker_ids=list(forged), timeout=1)
        assert "hunter2" not in str(error.value) and f"process {victim.pid} is gone" in str(error.value)
        second.stop_workers(type="kill", kill_grace=0.2)
        second.detect_lost_workers()
        assert victim.poll() is None  # never signalled
        assert "hunter2" not in str(rush.worker_info.to_dict())
        second.close()
    finally:
        victim.kill()
        victim.wait()
