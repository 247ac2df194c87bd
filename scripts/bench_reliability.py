"""rush-hpc reliability and scale benchmark: prints numbers, asserts invariants, never times a test.

usage: scripts/bench --reliability [--soak-seconds 180] [--soak-workers 32] [--scale 1000,10000]
                                   [--rows 10000,100000,1000000] [--skip-soak] [--skip-restart]

* soak: N local workers pop and finish queued tasks (max_retries=3) for a while, with random SIGKILL,
  SIGSTOP and SIGCONT; then the rest drains. Prints tasks done, workers lost, tasks requeued and failed,
  stuck (running at the end: must be 0) and duplicates (finished twice: must be 0). Exit 1 otherwise.
* scale: simulated workers (hashes + heartbeats written directly) — Redis CPU for their heartbeats
  and the time of detect_lost_workers with all alive, then with 10% expired.
* rows: fetch_tasks_with_state / fetch_finished_tasks cold and warm at each size, with the longest
  Redis command in that time (SLOWLOG) and the worst PING latency seen by a concurrent client.
* restart: vignette throughput before, across and after a Redis SIGKILL + restart (AOF always).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

import rush_hpc
from rush_hpc.config import RedisConfig
from rush_hpc.server import free_port

SECRET = b"bench-secret-0123456789abcdef"


def start_redis(directory: Path, *args: str, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH; run scripts/install-deps")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                "--save", "", "--logfile", str(directory / "redis.log"),
                                "--maxclients", "20000", *args], stdin=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            if client.ping():
                break
        except redis.RedisError:
            time.sleep(0.02)
    return process, port


# -- soak -------------------------------------------------------------------------------------------
def wl_soak(rush) -> None:
    while not rush.terminated:
        task = rush.pop_task(timeout=0.5)
        if task is not None:
            time.sleep(task.xs["sleep"])
            rush.push_results(task.key, [{"y": task.xs["x"]}])


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def soak(config: RedisConfig, seconds: float, n_workers: int) -> bool:
    rng = random.Random(1)
    rush = rush_hpc.rsh(network=f"soak-{os.getpid()}", config=config, secret=SECRET)
    settings = {"heartbeat_period": 0.5, "heartbeat_expire": 3.0}
    n_tasks = int(seconds * n_workers * 4)  # about a quarter of a second of work per task per worker
    keys = rush.push_tasks([{"x": i, "sleep": rng.uniform(0.05, 0.4)} for i in range(n_tasks)], max_retries=3)
    rush.start_local_workers(worker_loop=wl_soak, n_workers=n_workers, **settings)
    rush.start_monitor(interval=1.0)
    stopped: list[int] = []
    kills = stops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 1.0))
        info = rush.worker_info
        alive = info[info["state"] == "running"]
        if len(alive) < n_workers // 2:  # keep the pool from dying out: replace the lost
            rush.start_local_workers(worker_loop=wl_soak, n_workers=n_workers - len(alive), **settings)
            continue
        pid = int(alive.sample(1, random_state=rng.randrange(1 << 30))["pid"].iloc[0])
        action = rng.choice(["kill", "stop", "stop", "cont"])
        if action == "kill":
            _signal(pid, signal.SIGKILL)
            kills += 1
        elif action == "stop":
            _signal(pid, signal.SIGSTOP)
            stopped.append(pid)
            stops += 1
        elif stopped:
            _signal(stopped.pop(rng.randrange(len(stopped))), signal.SIGCONT)
    for pid in stopped:
        _signal(pid, signal.SIGCONT)
    rush.start_local_workers(worker_loop=wl_soak, n_workers=n_workers, **settings)
    started = time.monotonic()
    try:
        rush.wait_for_tasks(keys, timeout=600)
    except rush_hpc.RushError as error:
        print(f"  drain did not complete: {error}", file=sys.stderr)
    rush._monitor_stop.set()
    rush.detect_lost_workers()
    counts = rush.counts()
    finished = rush.fetch_finished_tasks()
    duplicates = len(finished) - finished["keys"].nunique()
    requeued = sum(int(rush.redis.hget(rush.keys.task(k), "n_retries") or 0) for k in keys)
    states = rush.worker_info["state"].value_counts().to_dict()
    print(f"| soak: {n_workers} local workers, {seconds:.0f} s, {kills} SIGKILL, {stops} SIGSTOP | "
          f"{counts['finished']} of {n_tasks} tasks finished, {counts['failed']} failed (retries used up), "
          f"{requeued} requeues, workers {states}; drained in {time.monotonic() - started:.0f} s | |")
    print(f"| soak: stuck (running at the end) | {counts['running']} | must be 0 |")
    print(f"| soak: duplicates (finished twice) | {duplicates} | must be 0 |")
    rush.stop_workers(type="kill")
    rush.reset()
    rush.close()
    return counts["running"] == 0 and duplicates == 0 and counts["finished"] + counts["failed"] == n_tasks


# -- scale: simulated workers ------------------------------------------------------------------
def simulate_workers(rush, n: int, expired_fraction: float) -> None:
    pipe = rush.redis.pipeline(transaction=False)
    now = f"{time.time():.3f}"
    for i in range(n):
        worker_id = f"sim{i:06d}"
        pipe.hset(rush.keys.worker(worker_id), mapping={
            "worker_id": worker_id, "state": "running", "launcher": "script", "started_at": now,
            "heartbeat_period": "0.5", "heartbeat_expire": "2.0"})
        pipe.sadd(rush.keys.workers, worker_id)
        pipe.sadd(rush.keys.worker_state_set("running"), worker_id)
        if i >= n * expired_fraction:
            pipe.set(rush.keys.heartbeat(worker_id), now, px=60_000)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def scale(config: RedisConfig, sizes: list[int]) -> None:
    from rush_hpc.heartbeat import BeatLoop

    for n in sizes:
        rush = rush_hpc.rsh(network=f"scale-{n}-{os.getpid()}", config=config, secret=SECRET)
        simulate_workers(rush, n, 0.0)
        worker = rush_hpc.RushWorker(rush.network, config=config, secret=SECRET, worker_id="sim000000")
        beat = BeatLoop(worker, 0.5, 2.0, 60.0, config.client())
        cpu_before = rush.redis.info("cpu")
        started = time.perf_counter()
        for _ in range(n):  # one beat of every simulated worker = one second of heartbeats
            beat.beat()
        wall = time.perf_counter() - started
        cpu_after = rush.redis.info("cpu")
        cpu = (cpu_after["used_cpu_sys"] + cpu_after["used_cpu_user"]
               - cpu_before["used_cpu_sys"] - cpu_before["used_cpu_user"])
        print(f"| heartbeats of {n:,} workers (one beat each) | Redis CPU {cpu * 1000:.0f} ms per round of beats "
              f"({cpu / n * 1e6:.1f} us per beat; client wall {wall:.2f} s from one client) | |")
        started = time.perf_counter()
        assert rush.detect_lost_workers() == []
        alive = time.perf_counter() - started
        rush.redis.delete(*[rush.keys.heartbeat(f"sim{i:06d}") for i in range(n // 10)])
        started = time.perf_counter()
        lost = rush.detect_lost_workers()
        marking = time.perf_counter() - started
        print(f"| detect_lost_workers, {n:,} workers | {alive * 1000:.0f} ms all alive; {marking * 1000:.0f} ms "
              f"marking {len(lost):,} lost | |")
        worker.close()
        rush.reset()
        rush.close()


# -- rows: big fetches, and how long Redis is blocked ----------------------------------------------
class PingWatcher:
    """PINGs Redis from a separate process (so that the measured client's GIL does not delay it) and
    reports the worst round trip it saw."""

    def __init__(self, config: RedisConfig) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._stop, self._worst = ctx.Event(), ctx.Value("d", 0.0)
        self._process = ctx.Process(target=self._run, args=(config,), daemon=True)
        self.worst = 0.0

    def _run(self, config: RedisConfig) -> None:
        client = config.client()
        client.ping()
        while not self._stop.is_set():
            started = time.perf_counter()
            client.ping()
            elapsed = time.perf_counter() - started
            if elapsed > self._worst.value:
                self._worst.value = elapsed
            time.sleep(0.002)

    def start(self) -> None:
        self._process.start()
        time.sleep(0.2)  # connected and pinging

    def stop(self) -> float:
        self._stop.set()
        self._process.join(10)
        self.worst = self._worst.value
        return self.worst


def fill(rush, n: int) -> None:
    worker = rush_hpc.RushWorker(rush.network, config=rush.config, secret=SECRET)
    worker.register()
    batch = 20_000
    for start in range(0, n, batch):
        keys = worker.push_running_tasks([{"x1": i * 0.5, "x2": i * 0.25} for i in range(start, min(n, start + batch))])
        worker.push_results(keys, [{"y": 1.5}] * len(keys))
    worker.close()


def rows(config: RedisConfig, sizes: list[int]) -> None:
    for n in sizes:
        rush = rush_hpc.rsh(network=f"rows-{n}-{os.getpid()}", config=config, secret=SECRET)
        fill(rush, n)
        rush.redis.config_set("slowlog-log-slower-than", 0)
        rush.redis.config_set("slowlog-max-len", 100_000)
        for name, call in (("fetch_tasks_with_state", lambda: rush.fetch_tasks_with_state()),
                           ("fetch_finished_tasks", rush.fetch_finished_tasks)):
            timings = []
            for _ in range(2):  # cold, then warm
                rush.redis.slowlog_reset()
                watcher = PingWatcher(config)
                watcher.start()
                started = time.perf_counter()
                frame = call()
                timings.append(time.perf_counter() - started)
                watcher.stop()
                slowest = max((entry["duration"] for entry in rush.redis.slowlog_get(100_000)), default=0)
                timings.append(slowest / 1e6)
                timings.append(watcher.worst)
                assert len(frame) == n
            print(f"| {name}, {n:,} rows | cold {timings[0] * 1000:.0f} ms (longest Redis command "
                  f"{timings[1] * 1000:.1f} ms, worst concurrent PING {timings[2] * 1000:.1f} ms); warm "
                  f"{timings[3] * 1000:.0f} ms (longest {timings[4] * 1000:.1f} ms, PING {timings[5] * 1000:.1f} ms) "
                  f"| PING < 50 ms |")
        rush.redis.config_set("slowlog-log-slower-than", 10_000)
        rush.reset()
        rush.close()


# -- restart: throughput across a Redis restart ----------------------------------------------------
def wl_vignette(rush) -> None:
    while not rush.terminated:
        key = rush.push_running_tasks([{"x": random.random()}])
        rush.push_results(key, [{"y": 1.0}])


def restart(directory: Path) -> None:
    process, port = start_redis(directory, "--appendonly", "yes", "--appendfsync", "always")
    config = RedisConfig(port=port)
    rush = rush_hpc.rsh(network="restart", config=config, secret=SECRET, redis_outage_timeout=60)
    ids = rush.start_local_workers(worker_loop=wl_vignette, n_workers=4)
    rush.wait_for_workers(worker_ids=ids)
    rush.start_monitor(interval=1.0)

    def rate(seconds: float) -> float:
        before = rush.n_finished_tasks
        time.sleep(seconds)
        return (rush.n_finished_tasks - before) / seconds

    before = rate(3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.monotonic()
    time.sleep(3)
    process, _ = start_redis(directory, "--appendonly", "yes", "--appendfsync", "always", port=port)
    finished_at_restart = rush.n_finished_tasks
    while rush.n_finished_tasks == finished_at_restart:
        time.sleep(0.01)
    resumed = time.monotonic() - killed_at
    after = rate(3)
    lost = [w for w in ids if w not in rush.running_worker_ids]
    print(f"| vignette loop, 4 workers, Redis SIGKILLed and restarted after 3 s (AOF always) | {before:,.0f} "
          f"tasks/s before, work resumed {resumed:.1f} s after the kill, {after:,.0f} tasks/s after; "
          f"workers lost: {len(lost)} | 0 lost |")
    rush.stop_workers(type="kill")
    rush.reset()
    rush.close()
    process.terminate()
    process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-seconds", type=float, default=180)
    parser.add_argument("--soak-workers", type=int, default=32)
    parser.add_argument("--scale", default="1000,10000")
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--skip-soak", action="store_true")
    parser.add_argument("--skip-restart", action="store_true")
    args = parser.parse_args(argv)
    import tempfile

    ok = True
    with tempfile.TemporaryDirectory(prefix="rush-bench-") as tmp:
        process, port = start_redis(Path(tmp) / "redis")
        config = RedisConfig(port=port)
        print("| measurement | result | target |\n|---|---|---|")
        try:
            time.sleep(3)  # Redis up longer than the simulated heartbeat window (else: restart grace)
            if args.scale:
                scale(config, [int(n) for n in args.scale.split(",")])
            if args.rows:
                rows(config, [int(n) for n in args.rows.split(",")])
            if not args.skip_soak:
                ok = soak(config, args.soak_seconds, args.soak_workers)
        finally:
            process.terminate()
            process.wait()
        if not args.skip_restart:
            restart(Path(tmp) / "restart")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
