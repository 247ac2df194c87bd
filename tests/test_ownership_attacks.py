"""Task ownership under attack (issue 10): the adversarial review's cases, kept as regression tests.

Each test states the invariant it checks; each failed on the first version of the ownership change.
Real Redis, real worker processes; faults injected with a TCP proxy or interleavings forced by
wrapping one client call.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

import rush_hpc
from rush_hpc.config import RedisConfig

from conftest import SECRET, wait_until
from faults import DroppingProxy
from test_ownership import pid_of, process_gone

FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}


def where(raw, rush, key: str) -> list[str]:
    """The collections that hold task ``key`` (a live task is in exactly one of them)."""
    found = []
    if key.encode() in raw.lrange(rush.keys.queued, 0, -1):
        found.append("queued")
    if raw.sismember(rush.keys.running, key):
        found.append("running")
    if key.encode() in raw.lrange(rush.keys.failed, 0, -1):
        found.append("failed")
    for worker in raw.smembers(rush.keys.priority_workers):
        if key.encode() in raw.lrange(rush.keys.priority(worker.decode()), 0, -1):
            found.append("priority")
    return found


# -- 1. a priority task pushed while its worker ends is stranded forever ---------------------------
def test_a_priority_task_pushed_while_its_worker_ends_is_not_stranded(rush, worker, raw):
    """The worker ends just before push_priority_tasks: the choice "its priority list or the shared
    queue" is made in the creating script, so the task goes to the shared queue. And a priority list
    left behind by a worker that is not running (written by anyone) is moved by the sweep."""
    rush.end_worker(worker.worker_id, "terminated", ("running",), "ended")
    [key] = rush.push_priority_tasks([{"x": 1}], priority=[worker.worker_id])
    assert where(raw, rush, key) == ["queued"]
    raw.lpop(rush.keys.queued)
    raw.rpush(rush.keys.priority(worker.worker_id), key)
    raw.sadd(rush.keys.priority_workers, worker.worker_id)
    rush.detect_lost_workers()
    assert where(raw, rush, key) == ["queued"], f"task is in {where(raw, rush, key)}"


# -- 2. a re-sent END_WORKER (kill) leaves the worker process running ------------------------------
def wl_pop_then_compute_long(rush):
    while not rush.terminated:
        task = rush.pop_task(timeout=0.2)
        if task is not None:
            time.sleep(60)  # a long task: no Redis call for a minute
            rush.push_results(task.key, [{"y": 1}])


@pytest.mark.parametrize("drop", [False, True], ids=["reply-arrives", "reply-lost"])
def test_stop_workers_kill_with_a_lost_reply_still_kills(redis_config, network, drop):
    """stop_workers(kill): END_WORKER runs, its reply is lost, redis-py re-sends it, the repeat is
    refused (state is already 'killed') -> _kill skips the worker: no 'kill' message, no
    launcher.kill. Without a heartbeat the process keeps computing (on SLURM: the job keeps its
    allocation) until its next task call."""
    proxy = DroppingProxy(redis_config.port)
    rush = rush_hpc.rsh(network=network, config=RedisConfig(port=proxy.port), secret=SECRET)
    try:
        [worker_id] = rush.start_local_workers(worker_loop=wl_pop_then_compute_long, n_workers=1,
                                               heartbeat_period=None, heartbeat_expire=None)
        rush.wait_for_workers(worker_ids=[worker_id])
        rush.push_tasks([{"x": 1}])
        wait_until(lambda: rush.n_running_tasks == 1, what="the task to run")
        pid = pid_of(rush, worker_id)
        if drop:
            proxy.pattern = rush._shas["END_WORKER"].encode()
        rush.stop_workers(type="kill", kill_grace=0.5)
        assert proxy.dropped == int(drop)
        assert rush.worker_info.set_index("worker_id").loc[worker_id, "state"] == "killed"
        wait_until(lambda: process_gone(pid), timeout=5, what=f"killed worker process {pid} to exit")
    finally:
        rush._supervisor.kill(list(rush._supervisor.handles), grace=0.0)  # by the handles it holds
        rush.reset()
        rush.close()
        proxy.close()


# -- 3. terminate is a signal now: a loop that owns SIGUSR1 never hears it --------------------------
def wl_with_faulthandler_on_usr1(rush):
    import faulthandler

    faulthandler.register(signal.SIGUSR1, chain=False)  # common on HPC: dump stacks on USR1
    while not rush.terminated:
        task = rush.pop_task(timeout=0.1)
        if task is not None:
            rush.push_results(task.key, [{"y": 1}])


def test_terminate_reaches_a_loop_that_uses_sigusr1(rush):
    """The heartbeat child consumes the 'terminate' message (BLPOP) and sends SIGUSR1; a loop that
    registered its own SIGUSR1 handler (faulthandler, a profiler, MPI) never sees rush.terminated,
    and the message is gone from Redis. (With SIG_DFL the worker would die and be 'lost'.)"""
    [worker_id] = rush.start_local_workers(worker_loop=wl_with_faulthandler_on_usr1, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=[worker_id])
    time.sleep(0.5)  # the loop has installed its handler
    rush.stop_workers(type="terminate")
    wait_until(lambda: rush.worker_info.set_index("worker_id").loc[worker_id, "state"] == "terminated",
               timeout=8, what="the worker to terminate")


# -- 4. a task hash value makes END_WORKER / the sweep abort halfway: the task vanishes -------------
@pytest.mark.parametrize("n_retries", ["not a number", "1.5"])
def test_a_bad_retry_counter_does_not_make_a_task_vanish(rush, worker, raw, n_retries):
    """release_task() uses HINCRBY; on a non-integer (or max int) counter the script errors after it
    removed the task from the running set and moved the worker to 'lost' (Lua scripts do not roll
    back). The task is then in no collection, state 'running' forever; wait_for_tasks hangs."""
    keys = rush.push_tasks([{"x": 1}, {"x": 2}], max_retries=3)
    popped = [worker.pop_task().key, worker.pop_task().key]
    raw.hset(rush.keys.task(popped[0]), "n_retries", n_retries)  # a writer without the secret
    try:
        rush.end_worker(worker.worker_id, "lost", ("running",), "lost: test")
    except redis.ResponseError:
        pass  # raising is acceptable; losing tasks is not
    for key in keys:
        assert len(where(raw, rush, key)) == 1, f"task {key} is in {where(raw, rush, key)}"


# -- 5. a call that executed but raised (outage longer than outage_timeout) strands its task ---------
@pytest.fixture
def fragile_worker(redis_config, network, rush):
    """A worker whose client does not ride outages (outage_timeout=0: the first lost reply raises),
    like any worker after an outage longer than redis_outage_timeout."""
    proxy = DroppingProxy(redis_config.port)
    worker = rush_hpc.RushWorker(network, config=RedisConfig(port=proxy.port, outage_timeout=0),
                                 secret=SECRET)
    worker.register()
    worker.pop_task()  # load the scripts
    worker.push_results(worker.push_running_tasks([{"warm": 1}]), [{"y": 0}])
    yield worker, proxy
    worker.close()
    proxy.close()


def test_a_pop_that_raised_after_it_popped_does_not_strand_the_task(rush, fragile_worker):
    """pop_task makes a new request id per call: the loop retries after the ConnectionError (as
    loops that catch Exception do), gets another task, and the first one stays 'running', held by a
    live worker, until that worker ends (hours on a long run); wait_for_tasks on it hangs meanwhile."""
    worker, proxy = fragile_worker
    rush.push_tasks([{"x": 1}, {"x": 2}])
    proxy.drop_next_reply()
    with pytest.raises(redis.ConnectionError):
        worker.pop_task()
    handed = []
    while (task := worker.pop_task()) is not None:  # the loop goes on
        handed.append(task.key)
        worker.push_results(task.key, [{"y": 1}])
    assert rush.n_running_tasks == 0, f"{rush.n_running_tasks} task(s) running that the worker never got"


def test_a_create_that_raised_after_it_created_does_not_duplicate(rush, fragile_worker):
    """Same for push_running_tasks: ids are made per call and lost with the exception."""
    worker, proxy = fragile_worker
    before = rush.n_tasks
    proxy.drop_next_reply()
    with pytest.raises(redis.ConnectionError):
        worker.push_running_tasks([{"x": 1}])
    keys = worker.push_running_tasks([{"x": 1}])  # the loop retries the same point
    worker.push_results(keys, [{"y": 1}])
    assert rush.n_tasks == before + 1 and rush.n_running_tasks == 0, (
        f"{rush.n_tasks - before} tasks created, {rush.n_running_tasks} left running")


# -- 6. a worker hash value crashes detect_lost_workers (and with it wait_for_tasks / the monitor) ----
@pytest.mark.parametrize("value", ["abc", "inf"])
def test_a_bad_heartbeat_expire_in_a_worker_hash_does_not_blind_the_controller(
        rush, worker, raw, redis_config, network, value):
    """_in_outage_grace() does float(h['heartbeat_expire']) on every running worker's hash: 'abc'
    raises ValueError out of detect_lost_workers; 'inf' makes the grace window infinite, so no
    worker is ever declared lost by heartbeat again."""
    # a Redis started less than one heartbeat window ago means "maybe after an outage": no verdicts
    wait_until(lambda: int(raw.info("server")["uptime_in_seconds"]) >= 2, 5, poll=0.1, what="Redis uptime")
    frozen = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
    frozen.register(heartbeat_period="0.2", heartbeat_expire="1")  # registered, never beats
    raw.hset(rush.keys.worker(worker.worker_id), "heartbeat_expire", value)  # a writer
    assert frozen.worker_id in rush.detect_lost_workers()
    frozen.close()


# -- 7. a normally ended worker leaves its control list behind (one key per worker, forever) --------
def wl_one_task(rush):
    task = rush.pop_task(timeout=5)
    rush.push_results(task.key, [{"y": 1}])


def test_an_ended_worker_leaves_no_control_key(rush, raw):
    """bootstrap ends the worker (state 'terminated') before heartbeat.stop(): when the child beats
    in that gap it sees the state and returns without clear(); stop() then RPUSHes '__wake__' into a
    list nobody reads (and the heartbeat key lingers). A race: a short period makes it likely."""
    ids = rush.start_local_workers(worker_loop=wl_one_task, n_workers=4, heartbeat_period=0.02,
                                   heartbeat_expire=1.0)
    rush.wait_for_workers(worker_ids=ids)
    pids = [pid_of(rush, w) for w in ids]
    rush.push_tasks([{"x": i} for i in range(4)])
    for pid in pids:
        wait_until(lambda: process_gone(pid), what="the workers to end")
    left = {w: raw.lrange(rush.keys.control(w), 0, -1) for w in ids if raw.exists(rush.keys.control(w))}
    assert not left, left


# -- 8. wait_for_tasks raises at once for workers started with worker_script() ----------------------
def wl_drain(rush):
    while (task := rush.pop_task(timeout=2)) is not None:
        rush.push_results(task.key, [{"y": task.xs["x"]}])


def test_wait_for_tasks_waits_for_workers_started_from_worker_script(rush, tmp_path):
    """worker_script() is "the shell line that starts one worker anywhere, for any scheduler": such
    workers have no record until they register (no 'launched' state), so wait_for_tasks (no timeout)
    raises NoWorkersError on its first check, while the user's job is still in the queue. Before this
    change the same code waited and returned."""
    import subprocess
    import sys

    line = rush.worker_script(worker_loop=wl_drain, python=sys.executable,
                              credentials_file=str(tmp_path / "cred.json"), **FAST)
    keys = rush.push_tasks([{"x": i} for i in range(3)])
    job = subprocess.Popen(f"sleep 1.5; {line}", shell=True)  # a scheduler starts it a bit later
    try:
        rush.wait_for_tasks(keys, timeout=60)
    finally:
        job.wait(60)
    assert set(rush.task_states(keys).values()) == {"finished"}


# -- 9. the forked heartbeat child pins a private copy of the worker's pre-fork memory --------------
def wl_touch_globals(rush):
    while not rush.terminated:
        task = rush.pop_task(timeout=0.2)
        if task is not None:
            rush.push_results(task.key, [{"y": sum(x for x in data)}])  # noqa: F821 - a global


def test_the_heartbeat_child_does_not_double_the_workers_memory(rush):
    """The child is forked after load_payload, so it shares the unpickled globals copy-on-write.
    Touching Python objects (refcounts) makes the parent copy every page; the child keeps the
    originals for the whole worker life: ~2x memory for object-heavy globals (an OOM under SLURM
    --mem). R rush's heartbeat is a fresh process. Here: 4M ints (~150 MB) -> ~130 MB extra."""
    import psutil

    data = list(range(4_000_000))
    [worker_id] = rush.start_local_workers(worker_loop=wl_touch_globals, globals={"data": data},
                                           n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=[worker_id])
    [child] = psutil.Process(pid_of(rush, worker_id)).children()
    [key] = rush.push_tasks([{"x": 1}])
    rush.wait_for_tasks([key], timeout=60)
    assert child.memory_full_info().uss < 40 * 2**20, f"heartbeat child holds {child.memory_full_info().uss >> 20} MB"


# -- 10. stop_workers(kill) skips a worker already declared lost: its process lives on -------------
def test_kill_reaches_a_worker_that_was_declared_lost(rush):
    """A frozen (or cut-off) worker is declared lost; stop_workers(type="kill", worker_ids=[it]) and
    reset() then do nothing to it: END_WORKER refuses ('lost' is not launched/running), so _kill
    skips it (no launcher.kill, no scancel). The frozen process stays forever (its heartbeat child
    waits for it to resume); a suspended SLURM job keeps its allocation."""
    [worker_id] = rush.start_local_workers(worker_loop=wl_pop_then_compute_long, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=[worker_id])
    pid = pid_of(rush, worker_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: worker_id in rush.detect_lost_workers(), timeout=10, poll=0.1, what="lost")
        rush.stop_workers(type="kill", worker_ids=[worker_id], kill_grace=0.5)
        wait_until(lambda: process_gone(pid), timeout=5, what=f"process {pid} of the killed lost worker to end")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # its heartbeat child then ends it
        except ProcessLookupError:
            pass


# -- 11. link down + kill + reset + link up: the worker must be gone within 2 periods --------------
def test_a_worker_cut_off_then_reset_is_gone_within_two_periods_of_link_up(redis_config, network):
    """Issue 10: 'link down + kill + reset + link up (the worker must be gone within 2 periods)'.
    A beat sent into the dead link must be given up within about a period (short socket timeouts
    on the heartbeat's own connection), so the child learns of the reset soon after the link is back."""
    settings = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}
    proxy = DroppingProxy(redis_config.port)
    launching = rush_hpc.rsh(network=network, config=RedisConfig(port=proxy.port), secret=SECRET)
    rush = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    [worker_id] = launching.start_local_workers(worker_loop=wl_pop_then_compute_long, n_workers=1, **settings)
    rush.wait_for_workers(worker_ids=[worker_id])
    pid = pid_of(rush, worker_id)
    rush.push_tasks([{"x": 1}])
    wait_until(lambda: rush.n_running_tasks == 1, what="the task to run")
    proxy.down = True
    try:
        wait_until(lambda: worker_id in rush.detect_lost_workers(), timeout=10, poll=0.1, what="lost")
        rush.reset()  # (a kill over SSH cannot reach a host whose link is down: only Redis tells it)
        opened = proxy.accepted
        wait_until(lambda: proxy.accepted > opened, timeout=10, poll=0.005, what="a new beat attempt")
    finally:
        proxy.down = False  # link up, right after the child sent a beat into the dead link
    up = time.monotonic()
    wait_until(lambda: process_gone(pid), timeout=10, poll=0.01, what="the worker to exit")
    took = time.monotonic() - up
    try:
        assert took <= 2 * settings["heartbeat_period"] + 0.3, f"gone {took:.2f} s after the link came up"
    finally:
        launching.close()
        rush.close()
        proxy.close()


# -- 12. pop idempotency is per worker, not per request: two threads of one worker -----------------
def test_a_re_sent_pop_returns_its_own_task_when_another_pop_came_between(rush, worker):
    """A worker that pops from two threads: pop R1 runs (reply lost), pop R2 runs, redis-py re-sends
    R1 -> it must get R1's task back (not a third one, which would leave the first running, held by a
    live worker, until it ends). Reproduced at the script level (the re-send is the same EVALSHA with
    the same arguments)."""
    keys = rush.push_tasks([{"x": i} for i in range(3)])
    script_keys = [rush.keys.priority(worker.worker_id), rush.keys.queued, rush.keys.running,
                   rush.keys.worker(worker.worker_id), rush.keys.held_tasks(worker.worker_id)]

    def pop(request: str) -> str:
        return worker._script("POP_TASK", script_keys, [rush.keys.task_prefix, worker.worker_id, request])[0]

    first = pop("r1")   # reply lost
    pop("r2")           # another thread's pop
    again = pop("r1")   # redis-py re-sends r1
    assert again == first, f"re-sent pop got {again!r}, {first!r} is stranded"
    assert rush.n_queued_tasks == 1 and len(keys) == 3
