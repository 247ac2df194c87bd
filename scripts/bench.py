"""rush-hpc benchmark: prints a markdown table of throughput and latency numbers, measured in one run.

usage: scripts/bench [--quick] [--ssh] [--slurm] [--bo | --bo-only]
Starts its own redis-server (from PATH, else the embedded one) on 127.0.0.1. --ssh/--slurm need
scripts/test-cluster up (they read .test-cluster/cluster.env). --bo compares the Bayesian
optimization example with random search (median best y over 20 seeds; a few minutes, needs the
examples extra).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

import rush_hpc
from rush_hpc.config import RedisConfig
from rush_hpc.server import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"bench-secret-0123456789abcdef"
ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, target: str = "") -> None:
    ROWS.append((what, value, target))
    print(f"  {what}: {value} {('(target ' + target + ')') if target else ''}", file=sys.stderr, flush=True)


# -- 0. encoding ----------------------------------------------------------------------------------
def bench_codec() -> None:
    """Why plain task values are JSON: the same dict through JSON and through signed cloudpickle."""
    import timeit

    from rush_hpc.codec import Codec

    codec, value = Codec(SECRET), {"x1": 1.2345, "x2": 6.789, "max_depth": 7, "kernel": "rbf"}
    json_blob, pickle_blob = codec.encode(value), codec.dumps_pickle(value)
    n = 20_000
    results = {
        "JSON": (timeit.timeit(lambda: codec.encode(value), number=n) / n,
                 timeit.timeit(lambda: codec.decode(json_blob), number=n) / n, len(json_blob)),
        "signed cloudpickle": (timeit.timeit(lambda: codec.dumps_pickle(value), number=n) / n,
                               timeit.timeit(lambda: codec.loads_pickle(pickle_blob), number=n) / n,
                               len(pickle_blob)),
    }
    for name, (encode, decode, size) in results.items():
        row(f"encode / decode a 4-field task dict, {name}",
            f"{encode * 1e6:.1f} us / {decode * 1e6:.1f} us, {size} bytes")


# -- 1. the vignette loop ---------------------------------------------------------------------
def rush_loop(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
    worker.register()
    barrier.wait()
    while worker.n_finished_tasks < n_total:
        xs = {"x1": 1.5, "x2": 2.5}
        key = worker.push_running_tasks([xs])
        worker.push_results(key, [{"y": 3.25}])


# The floors: the same Redis work with raw redis-py and the fewest round trips, without rush-hpc's
# checks (no fence, no ownership, no idempotence): what a hand-written client could reach.
FLOOR_CREATE = """
redis.call('HSET', KEYS[1], 'xs', ARGV[1], 'state', 'running', 'worker_id', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
"""
FLOOR_FINISH = """
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'ys', ARGV[2], 'state', 'finished')
redis.call('RPUSH', KEYS[3], '["' .. ARGV[1] .. '",{"x1":1.5,"x2":2.5},' .. string.sub(ARGV[2], 2) .. ',null,null,"w"]')
return redis.call('LLEN', KEYS[3])
"""
FLOOR_FINISH_AND_POP = FLOOR_FINISH.replace("return redis.call('LLEN', KEYS[3])", """
local id = redis.call('LPOP', KEYS[4])
if not id then return false end
redis.call('SADD', KEYS[2], id)
redis.call('HSET', ARGV[3] .. id, 'state', 'running', 'worker_id', 'w')
return {id, redis.call('HGET', ARGV[3] .. id, 'xs')}
""")


def floor_loop(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    """The vignette step in 2 round trips: create (one script), finish (one script, returns the count)."""
    client = config.client()
    prefix = f"rush:{{{network}}}:"
    create, finish = client.register_script(FLOOR_CREATE), client.register_script(FLOOR_FINISH)
    running, finished, all_tasks = prefix + "tasks:running", prefix + "tasks:finished", prefix + "tasks:all"
    barrier.wait()
    n_finished = 0
    while n_finished < n_total:
        task_id = uuid.uuid4().hex
        create(keys=[prefix + "task:" + task_id, all_tasks, running], args=[b'j{"x1":1.5,"x2":2.5}', task_id, "w"])
        n_finished = finish(keys=[prefix + "task:" + task_id, running, finished], args=[task_id, b'j{"y":3.25}'])


def run_forked(target, config: RedisConfig, network: str, n_procs: int, n_total: int) -> float:
    """Run ``target`` in ``n_procs`` forked processes that start together; returns the seconds."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n_procs + 1)
    procs = [ctx.Process(target=target, args=(config, network, n_total, barrier)) for _ in range(n_procs)]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.perf_counter()
    for p in procs:
        p.join()
    return time.perf_counter() - started


def run_processes(target, config: RedisConfig, n_procs: int, n_total: int) -> float:
    network = f"bench-{uuid.uuid4().hex[:8]}"
    elapsed = run_forked(target, config, network, n_procs, n_total)
    n = config.client().llen(f"rush:{{{network}}}:tasks:finished")
    cleanup(config, network)
    return n / elapsed


def cleanup(config: RedisConfig, network: str) -> None:
    client = config.client()
    keys = list(client.scan_iter(match=f"rush:{{{network}}}:*", count=10_000))
    for i in range(0, len(keys), 10_000):
        client.unlink(*keys[i:i + 10_000])


def bench_loop(config: RedisConfig, n_total: int, rounds: int = 3) -> None:
    """``n_total`` tasks split over ``rounds`` interleaved (ours, floor) pairs; the ratio is the
    median of the pairs' ratios (a slow phase of a shared machine slows both of a pair)."""
    for n_procs in (1, 2, 4):
        ours, floors = [], []
        for _ in range(rounds):
            ours.append(run_processes(rush_loop, config, n_procs, n_total // rounds))
            floors.append(run_processes(floor_loop, config, n_procs, n_total // rounds))
        ratio = statistics.median(o / f for o, f in zip(ours, floors))
        row(f"vignette loop, {n_procs} worker process(es)",
            f"{statistics.median(ours):,.0f} tasks/s; 2-round-trip redis-py floor {statistics.median(floors):,.0f} "
            f"tasks/s; ratio {ratio:.2f} (median of {rounds} rounds)", ">= 1.0 x floor")


# -- 2. queue ----------------------------------------------------------------------------------
def queue_worker(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
    worker.register()
    barrier.wait()
    while (task := worker.pop_task()) is not None:
        worker.push_results(task.key, [{"y": task.xs["x"] * 2}])


def queue_combined_worker(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
    worker.register()
    barrier.wait()
    task = worker.pop_task()
    while task is not None:
        task = worker.finish_and_pop(task.key, [{"y": task.xs["x"] * 2}])


def queue_floor_worker(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    """One round trip per task: finish the previous task and pop the next in one script."""
    client = config.client()
    prefix = f"rush:{{{network}}}:"
    step = client.register_script(FLOOR_FINISH_AND_POP)
    running, finished, queued = prefix + "tasks:running", prefix + "tasks:finished", prefix + "tasks:queued"
    barrier.wait()
    popped = step(keys=[prefix + "task:none", running, finished, queued], args=["none", b'j{"y":1}', prefix + "task:"])
    while popped:
        task_id = popped[0].decode()
        popped = step(keys=[prefix + "task:" + task_id, running, finished, queued],
                      args=[task_id, b'j{"y":1}', prefix + "task:"])


def run_queue(config: RedisConfig, target, n_tasks: int) -> tuple[float, float]:
    network = f"bench-{uuid.uuid4().hex[:8]}"
    rush = rush_hpc.rsh(network=network, config=config, secret=SECRET)
    started = time.perf_counter()
    rush.push_tasks([{"x": i} for i in range(n_tasks)])
    push = time.perf_counter() - started
    elapsed = run_forked(target, config, network, 4, n_tasks)
    assert rush.n_finished_tasks >= n_tasks, rush.n_finished_tasks
    rush.reset()
    rush.close()
    return push, n_tasks / elapsed


def bench_queue(config: RedisConfig, n_tasks: int, rounds: int = 3) -> None:
    """Each round runs the three loops back to back; a ratio is the median of the rounds' ratios
    (one run lasts under a second: a slow phase of a shared machine would decide a single pair)."""
    pushes, ours, combined, floors = [], [], [], []
    for _ in range(rounds):
        push, rate = run_queue(config, queue_worker, n_tasks)
        pushes.append(push)
        ours.append(rate)
        combined.append(run_queue(config, queue_combined_worker, n_tasks)[1])
        floors.append(run_queue(config, queue_floor_worker, n_tasks)[1])
    push, floor = statistics.median(pushes), statistics.median(floors)
    row(f"push_tasks {n_tasks:,}", f"{push:.3f} s ({n_tasks / push:,.0f} tasks/s; median of {rounds})")
    row(f"queue: 4 workers pop_task + push_results (2 round trips), {n_tasks:,} tasks",
        f"{statistics.median(ours):,.0f} tasks/s; ratio to the 1-round-trip floor "
        f"{statistics.median(o / f for o, f in zip(ours, floors)):.2f}")
    row(f"queue: 4 workers finish_and_pop (1 round trip), {n_tasks:,} tasks",
        f"{statistics.median(combined):,.0f} tasks/s; 1-round-trip redis-py floor {floor:,.0f} tasks/s; ratio "
        f"{statistics.median(c / f for c, f in zip(combined, floors)):.2f} (median of {rounds} rounds)", ">= 0.9 x floor")


def wake_up_worker(config: RedisConfig, network: str, n_total: int, barrier) -> None:
    worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
    worker.register()
    barrier.wait()
    for _ in range(n_total):
        task = worker.pop_task(timeout=10)
        assert task is not None
        worker.push_results(task.key, [{"latency": time.time() - task.xs["t"]}])


def bench_wake_up(config: RedisConfig, n: int = 50) -> None:
    """An idle worker blocked in pop_task: how long from push_tasks to the task in its hands."""
    ctx = mp.get_context("fork")
    network = f"bench-{uuid.uuid4().hex[:8]}"
    rush = rush_hpc.rsh(network=network, config=config, secret=SECRET)
    barrier = ctx.Barrier(2)
    process = ctx.Process(target=wake_up_worker, args=(config, network, n, barrier))
    process.start()
    barrier.wait()
    for _ in range(n):
        time.sleep(0.02)  # the worker is idle and blocked again
        rush.push_tasks([{"t": time.time()}])
    process.join(60)
    latencies = sorted(rush.fetch_finished_tasks()["latency"])
    row("pop_task wake-up of an idle worker after push_tasks",
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, p90 {latencies[int(0.9 * len(latencies))] * 1000:.2f} ms "
        f"(n={len(latencies)})", "p50 <= 2 ms")
    rush.reset()
    rush.close()


def bench_memory(config: RedisConfig, n: int = 10_000) -> None:
    """Redis memory per finished vignette task, and where it goes (MEMORY USAGE of one task hash and of
    the lists). The total includes the key table's growth (it doubles in steps and never shrinks), so
    it is lower on a server whose table earlier benchmarks already grew."""
    network = f"bench-{uuid.uuid4().hex[:8]}"
    client = config.client()
    before = client.info("memory")["used_memory"]
    fill_finished(config, network, n)
    after = client.info("memory")["used_memory"]
    prefix = f"rush:{{{network}}}:"
    task_id = client.lindex(prefix + "tasks:all", n // 2).decode()
    task_hash = client.memory_usage(prefix + "task:" + task_id, samples=0) or 0
    finished = (client.memory_usage(prefix + "tasks:finished", samples=0) or 0) / n
    all_ids = (client.memory_usage(prefix + "tasks:all", samples=0) or 0) / n
    total = (after - before) / n
    row("Redis memory per finished vignette task",
        f"{total:.0f} B (task hash {task_hash} B, finished row {finished:.0f} B, id in the all-tasks list "
        f"{all_ids:.0f} B; the rest is the key table, which grows in steps)", "<= 350 B")
    cleanup(config, network)


# -- 3. fetch ----------------------------------------------------------------------------------
def fill_finished(config: RedisConfig, network: str, n: int) -> None:
    worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
    worker.register()
    for start in range(0, n, 5000):
        size = min(5000, n - start)
        keys = worker.push_running_tasks([{"x1": i * 0.5, "x2": -i * 0.25} for i in range(size)])
        worker.push_results(keys, [{"y": float(i)} for i in range(size)])
    worker.close()


def floor_fetch(config: RedisConfig, network: str) -> float:
    """The cold-fetch floor: the finished list read in the same chunks, ONE json.loads, a frame
    built from columns known in advance (no validation, no pickles, no per-row checks)."""
    import gc
    import json

    import pandas as pd

    from rush_hpc.keys import NetworkKeys

    client = config.client()
    key = NetworkKeys(network).finished
    started = time.perf_counter()
    rows: list[bytes] = []
    while True:
        chunk = client.lrange(key, len(rows), len(rows) + 4999)
        rows += chunk
        if len(chunk) < 5000:
            break
    gc.disable()
    try:
        data = json.loads(b"[" + b",".join(rows) + b"]")
        frame = pd.DataFrame({"x1": [r[1]["x1"] for r in data], "x2": [r[1]["x2"] for r in data],
                              "y": [r[2]["y"] for r in data], "worker_id": [r[6] for r in data],
                              "keys": [r[0] for r in data]})
    finally:
        gc.enable()
    elapsed = time.perf_counter() - started
    assert len(frame) == len(rows)
    client.close()
    return elapsed


def bench_fetch(config: RedisConfig, sizes: list[int]) -> None:
    from rush_hpc import rows

    decoder = "json" if rows._orjson is None else "orjson"
    for n in sizes:
        network = f"bench-{uuid.uuid4().hex[:8]}"
        fill_finished(config, network, n)
        colds, warms, floors = [], [], []
        runs = 5 if n >= 100_000 else 9  # a small fetch takes a few ms: more runs for a stable median
        for _ in range(runs):
            floors.append(floor_fetch(config, network))
            rush = rush_hpc.rsh(network=network, config=config, secret=SECRET)
            started = time.perf_counter()
            frame = rush.fetch_finished_tasks()
            colds.append(time.perf_counter() - started)
            assert len(frame) >= n
            worker = rush_hpc.RushWorker(network, config=config, secret=SECRET)
            worker.register()
            for _ in range(5):
                worker.push_results(worker.push_running_tasks([{"x1": 1.0, "x2": 2.0}]), [{"y": 0.5}])
                started = time.perf_counter()
                frame = rush.fetch_finished_tasks()
                warms.append(time.perf_counter() - started)
            worker.close()
            rush.close()
        cold, floor = statistics.median(colds), statistics.median(floors)
        # each cold fetch right after its floor: the median of the pairs' ratios (a slow phase of a
        # shared machine slows both of a pair)
        ratio = statistics.median(f / c for f, c in zip(floors, colds))
        row(f"fetch_finished_tasks {n:,} tasks, cold", f"{cold * 1000:.0f} ms (median of {runs}, rows decoded by "
            f"{decoder}); floor (LRANGE, one json.loads, known columns) {floor * 1000:.0f} ms; ratio {ratio:.2f} "
            f"(median of the {runs} pairs)", ">= 1.0 x floor")
        row(f"fetch_finished_tasks {n:,} tasks, warm + 1 new", f"{statistics.median(warms) * 1000:.2f} ms (median of {len(warms)})",
            "<= 2 ms")
        cleanup(config, network)


# -- 4. launched workers -------------------------------------------------------------------------
def wl_vignette(rush) -> None:
    while rush.n_finished_tasks < bench_n_tasks:  # noqa: F821 - a global
        key = rush.push_running_tasks([{"x1": 1.5, "x2": 2.5}])
        rush.push_results(key, [{"y": 3.25}])


bench_n_tasks = 0


def time_local_start(config: RedisConfig, n_workers: int) -> float:
    """Seconds from start_local_workers(n) until all n registered (a fresh controller)."""
    rush = rush_hpc.rsh(network=f"bench-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
    started = time.perf_counter()
    ids = rush.start_local_workers(wl_vignette, n_workers=n_workers, globals={"bench_n_tasks": 0})
    rush.wait_for_workers(worker_ids=ids, timeout=120, poll=0.005)
    elapsed = time.perf_counter() - started
    rush.reset()
    rush.close()
    return elapsed


def bench_local_workers(config: RedisConfig, n_total: int) -> None:
    from rush_hpc import forkserver

    forkserver.stop_templates()
    cold = time_local_start(config, 4)
    row("start_local_workers(4), the first of a process (starts the fork server: one import)", f"{cold:.3f} s")
    for n, target in ((4, "<= 0.25 s"), (64, "<= 1.5 s")):
        starts = [time_local_start(config, n) for _ in range(3)]
        row(f"start_local_workers({n}) until all registered", f"{statistics.median(starts):.3f} s (median of 3; "
            f"min {min(starts):.3f}; forked by the fork server)", target)
    os.environ[forkserver.FORK_ENV] = "0"
    try:
        single = {n: time_local_start(config, n) for n in (4, 64)}
    finally:
        del os.environ[forkserver.FORK_ENV]
    row("start_local_workers(4 / 64), one interpreter per worker (RUSH_HPC_FORK_SERVER=0)",
        f"{single[4]:.3f} s / {single[64]:.3f} s")
    rush = rush_hpc.rsh(network=f"bench-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
    ids = rush.start_local_workers(wl_vignette, n_workers=4, globals={"bench_n_tasks": n_total})
    rush.wait_for_workers(worker_ids=ids, timeout=60, poll=0.005)
    started = time.perf_counter()
    while len(rush._ids_in_state("terminated", "failed")) < 4:
        time.sleep(0.005)
    ours = rush.n_finished_tasks / (time.perf_counter() - started)
    rush.reset()
    rush.close()
    floor = run_processes(floor_loop, config, 4, n_total)
    row("vignette loop, 4 launched local workers", f"{ours:,.0f} tasks/s; floor {floor:,.0f}; ratio "
        f"{ours / floor:.2f}", ">= 0.7 x floor")


# -- 5. SSH and SLURM ------------------------------------------------------------------------------
def cluster_env() -> dict[str, str]:
    path = ROOT / ".test-cluster" / "cluster.env"
    if not path.exists():
        raise SystemExit("--ssh/--slurm need the test cluster: scripts/test-cluster up")
    env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    os.environ.update(env)
    return env


def wl_idle(rush) -> None:
    while not rush.terminated:
        time.sleep(0.05)


def bench_ssh() -> None:
    env = cluster_env()
    bridge = env["RUSH_TEST_BRIDGE_IP"]
    server = subprocess.Popen(["redis-server", "--port", "16931", "--bind", "127.0.0.1", bridge, "--save", "",
                               "--appendonly", "no", "--requirepass", "benchpw"], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        config = RedisConfig(host=bridge, port=16931, password="benchpw")
        times = []
        for _ in range(3):
            rush = rush_hpc.rsh(network=f"bench-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
            started = time.perf_counter()
            ids = rush.start_ssh_workers(wl_idle, hosts=env["RUSH_TEST_SSH_HOSTS"].split(","), n_workers=2,
                                         ssh_config=env["RUSH_TEST_SSH_CONFIG"],
                                         connect_kwargs={"look_for_keys": False, "allow_agent": False})
            rush.wait_for_workers(worker_ids=ids, timeout=60, poll=0.005)
            times.append(time.perf_counter() - started)
            rush.reset()
            rush.close()
        row("start_ssh_workers, 3 hosts x 2 workers, until all registered",
            f"{statistics.median(times):.2f} s (median of 3)", "<= 2 s")
    finally:
        server.terminate()
        server.wait()


def bench_slurm(config: RedisConfig) -> None:
    cluster_env()
    for launcher in ("sbatch", "slurm"):
        rush = rush_hpc.rsh(network=f"bench-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
        started_wall = time.time()
        started = time.perf_counter()
        start = rush.start_sbatch_workers if launcher == "sbatch" else rush.start_slurm_workers
        ids = start(wl_idle, n_workers=8, partition="debug", time=5, log_dir=f"/tmp/rush-bench-{launcher}")
        rush.wait_for_workers(worker_ids=ids, timeout=120, poll=0.005)
        registered = time.perf_counter() - started
        info = rush.worker_info
        raw = rush._worker_hashes(ids)
        job_started = max(float(h["process_started_at"]) for h in raw.values()) - started_wall
        rush.reset()
        rush.close()
        row(f"{launcher}: 8 workers, call until all registered",
            f"{registered:.2f} s; scheduler started the last job process after {job_started:.2f} s; "
            f"overhead {registered - job_started:.2f} s", "registration <= scheduler start + 1 s")
        del info


# -- 5b. elastic workers -----------------------------------------------------------------------------
def wl_adapt_queue(rush) -> None:
    while not rush.terminated:
        task = rush.pop_task(timeout=0.5)
        if task is not None:
            time.sleep(task.xs["sleep"])
            rush.push_results(task.key, [{"y": 1}])


def bench_adapt(config: RedisConfig, slurm: bool) -> None:
    """Time from 100 queued tasks to workers running them under adapt; jobs for a burst of 1,000."""
    launchers = [("local", {})]
    if slurm:
        cluster_env()
        launchers.append(("sbatch", {"partition": "debug", "time": 5, "log_dir": "/tmp/rush-bench-adapt"}))
    for launcher, options in launchers:
        rush = rush_hpc.rsh(network=f"bench-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
        rush.push_tasks([{"sleep": 0.05}] * 100)
        started = time.perf_counter()
        rush.adapt(0, 8, launcher=launcher, worker_loop=wl_adapt_queue, interval=0.2, idle_timeout=2, **options)
        while rush.n_running_tasks == 0 and rush.n_finished_tasks == 0:
            time.sleep(0.005)
        first = time.perf_counter() - started
        rush.wait_for_tasks(rush.fetch_tasks()["keys"].tolist(), timeout=300)
        drained = time.perf_counter() - started
        rush.push_tasks([{"sleep": 0.01}] * 1000)  # a burst: must not start more than maximum
        rush.wait_for_tasks(rush.fetch_tasks()["keys"].tolist(), timeout=300)
        started_total = int(rush.adapt_status()["started"])
        rush.adapt(None)
        rush.reset()
        rush.close()
        row(f"adapt(0, 8), {launcher}: 100 queued tasks", f"first task running after {first:.2f} s, all done after "
            f"{drained:.1f} s; workers started for these and a burst of 1,000 more: {started_total}", "<= 8 workers")


# -- 6. Bayesian optimization vs random search ----------------------------------------------------
def bench_bo(config: RedisConfig, seeds: int, budget: int, n_workers: int) -> None:
    """The examples as a user runs them (local worker processes), at the same budget: the best y among
    the first ``budget`` finished tasks (workers overshoot by a few tasks; those are not counted)."""
    from rush_hpc.examples import bayesian_optimization, random_search

    n_initial = 25
    best: dict[str, list[float]] = {"ADBO": [], "random search": []}
    stuck = 0
    started = time.perf_counter()
    for seed in range(seeds):
        for name in best:
            rush = rush_hpc.rsh(network=f"bench-bo-{uuid.uuid4().hex[:8]}", config=config, secret=SECRET)
            try:
                if name == "ADBO":
                    tasks = bayesian_optimization.run(rush, n_workers=n_workers, n_tasks=budget, n_initial=n_initial,
                                                      seed=seed, quiet=True, progress=False)
                    first = tasks.head(budget)
                    stuck += int(first["y"].min() >= first.head(n_initial)["y"].min())
                else:
                    tasks = random_search.run(rush, n_workers=n_workers, n_tasks=budget, quiet=True, progress=False)
                best[name].append(float(tasks.head(budget)["y"].min()))
            finally:
                rush.reset()
                rush.close()
        print(f"  seed {seed}: ADBO {best['ADBO'][-1]:.4f}, random search {best['random search'][-1]:.4f}",
              file=sys.stderr, flush=True)
    bo, rs = best["ADBO"], best["random search"]
    wins = sum(b < r for b, r in zip(bo, rs))
    row(f"Branin, {budget} evaluations, {n_workers} local workers: median best y over {seeds} seeds (optimum 0.3979)",
        f"ADBO {statistics.median(bo):.4f} (worst {max(bo):.4f}); random search {statistics.median(rs):.4f} "
        f"(worst {max(rs):.4f}); ADBO better in {wins} of {seeds}; ADBO never improved on its "
        f"{n_initial} initial points in {stuck} of {seeds}; {time.perf_counter() - started:.0f} s",
        "ADBO < random search")


def readme_table() -> dict[str, str]:
    """The last measured table in the README (measurement -> result)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Benchmark", 1)[-1].split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2 and cells[0] not in ("measurement", "---"):
            table.setdefault(cells[0], cells[1])
    return table


def headline(result: str) -> tuple[float, str] | None:
    """What a row is judged by: its ratio to the floor measured in the same run when it has one
    ('...; ratio 1.20' -> (1.2, 'x floor'): the load of a shared machine slows both alike), else its
    first number and unit: '2,133 tasks/s; ...' -> (2133.0, 'tasks/s')."""
    import re

    ratio = re.search(r"ratio (\d+(?:\.\d+)?)", result)
    if ratio:
        return float(ratio.group(1)), "x floor"
    match = re.search(r"([\d,]+(?:\.\d+)?)\s*(tasks/s|ms|us|s|B)\b", result)
    return (float(match.group(1).replace(",", "")), match.group(2)) if match else None


def regressions(rows: list[tuple[str, str, str]], last: dict[str, str], tolerance: float = 0.10) -> list[str]:
    """Rows more than ``tolerance`` worse than the same row of the README's table."""
    found = []
    for what, value, _ in rows:
        now, before = headline(value), headline(last.get(what, ""))
        if not now or not before or now[1] != before[1] or not before[0]:
            continue
        higher_is_better = now[1] in ("tasks/s", "x floor")
        change = (before[0] - now[0]) / before[0] if higher_is_better else (now[0] - before[0]) / before[0]
        if change > tolerance:
            found.append(f"{what}: {now[0]:g} {now[1]} against {before[0]:g} {before[1]} in the README "
                         f"({change:.0%} worse)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (no 100k fetch)")
    parser.add_argument("--ssh", action="store_true", help="also time SSH worker start (needs test-cluster)")
    parser.add_argument("--slurm", action="store_true", help="also time SLURM worker start (needs test-cluster)")
    parser.add_argument("--adapt", action="store_true", help="also time elastic workers (--slurm: on SLURM too)")
    parser.add_argument("--bo", action="store_true", help="also compare Bayesian optimization with random search")
    parser.add_argument("--bo-only", action="store_true", help="only the Bayesian optimization comparison")
    parser.add_argument("--bo-seeds", type=int, default=20, help="--bo: repetitions (default 20)")
    parser.add_argument("--bo-budget", type=int, default=100, help="--bo: evaluations per run (default 100)")
    parser.add_argument("--bo-workers", type=int, default=4, help="--bo: local workers per run (default 4)")
    args = parser.parse_args()
    server = EmbeddedRedis()
    config = server.config
    try:
        n_loop = 5_000 if args.quick else 20_000
        print(f"rush-hpc {rush_hpc.__version__} benchmark, {time.strftime('%Y-%m-%d')}, Python "
              f"{platform.python_version()}, redis-py {redis.__version__}, {server.binary}, "
              f"{os.cpu_count()} CPUs", file=sys.stderr)
        if not args.bo_only:
            bench_codec()
            bench_loop(config, n_loop)
            bench_queue(config, 10_000)
            bench_wake_up(config)
            bench_memory(config)
            bench_fetch(config, [10_000] if args.quick else [10_000, 100_000])
            bench_local_workers(config, n_loop)
        if args.ssh:
            bench_ssh()
        if args.slurm:
            bench_slurm(config)
        if args.adapt:
            bench_adapt(config, args.slurm)
        if args.bo or args.bo_only:
            bench_bo(config, args.bo_seeds, args.bo_budget, args.bo_workers)
    finally:
        server.stop()
    print(f"\nMeasured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}), Redis on 127.0.0.1.\n")
    print("| measurement | result | target |\n|---|---|---|")
    for what, value, target in ROWS:
        print(f"| {what} | {value} | {target} |")
    worse = regressions(ROWS, readme_table())
    if worse:
        print("\nREGRESSION (more than 10% worse than the README's table):\n" + "\n".join(f"- {w}" for w in worse))
        sys.exit(1)


if __name__ == "__main__":
    main()
