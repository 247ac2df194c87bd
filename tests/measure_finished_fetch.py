"""A measurement (not a test): how long one FETCH_ROWS call holds Redis when finished tasks
sit far apart in the finished list (finished in random order), and how long a re-sent finish's
LINDEX costs. Prints SLOWLOG maxima and a concurrent PING probe. Usage: python tests/measure_finished_fetch.py N [order] [probe seconds]"""
from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).parent))
import rush_hpc  # noqa: E402
from rush_hpc.config import RedisConfig  # noqa: E402
from conftest import SECRET, start_redis_server, stop  # noqa: E402


PROBE = """
import sys, time, redis
client = redis.Redis(port=int(sys.argv[1])); out = []
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.perf_counter(); client.ping(); out.append(time.perf_counter() - t); time.sleep(0.001)
out.sort(); print(len(out), out[len(out) // 2] * 1000, out[-1] * 1000)
"""


def main() -> None:
    n = int(sys.argv[1])
    order = sys.argv[2] if len(sys.argv) > 2 else "random"
    directory = Path(tempfile.mkdtemp())
    process, port = start_redis_server(directory)
    try:
        config = RedisConfig(port=port)
        rush = rush_hpc.rsh("m", config=config, secret=SECRET)
        worker = rush_hpc.RushWorker("m", config=config, secret=SECRET)
        worker.register()
        keys: list[str] = []
        t0 = time.perf_counter()
        for first in range(0, n, 2000):
            keys += worker.push_running_tasks([{"x1": random.random(), "x2": random.random()}
                                               for _ in range(min(2000, n - first))])
        order_keys = list(keys)
        if order == "random":
            random.Random(1).shuffle(order_keys)
        for first in range(0, n, 2000):
            batch = order_keys[first:first + 2000]
            worker.push_results(batch, [{"y": random.random()} for _ in batch])
        print(f"n={n} order={order}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        raw = redis.Redis(port=port)
        used = raw.info("memory")["used_memory"]
        print(f"used_memory {used / n:.0f} B per finished task (incl. baseline)")
        raw.config_set("slowlog-log-slower-than", 1000)  # 1 ms: PINGs never flood the log
        raw.config_set("slowlog-max-len", 100000)
        raw.slowlog_reset()
        pinger = subprocess.Popen([sys.executable, "-c", PROBE, str(port), sys.argv[3] if len(sys.argv) > 3 else "5"],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        t = time.perf_counter()
        frame = rush.fetch_tasks()
        wall = time.perf_counter() - t
        every = raw.slowlog_get(100000)
        top = sorted(every, key=lambda e: -e["duration"])[:3]
        print("slowlog entries", len(every), "top:", [(e["duration"] / 1000, (e["command"] or b"")[:40]) for e in top])
        log = [e for e in every if b"EVALSHA" in (e["command"] or b"")[:8].upper()]
        durations = sorted(e["duration"] for e in log)
        print(f"fetch_tasks: {len(frame)} rows in {wall:.2f} s; {len(durations)} FETCH_ROWS calls, "
              f"longest {durations[-1] / 1000:.1f} ms, median {durations[len(durations) // 2] / 1000:.1f} ms, "
              f"sum {sum(durations) / 1e6:.2f} s (calls >= 1 ms only)")
        count, p50, worst = pinger.communicate()[0].split()
        print(f"PING from another process during the fetch: n={count} p50 {float(p50):.2f} ms, max {float(worst):.1f} ms")
        # a re-sent finish: LINDEX of a row in the middle of the list
        raw.slowlog_reset()
        middle = order_keys[n // 2]
        keys_ = worker.keys
        worker._script("FINISH_TASKS", [keys_.running, keys_.finished, keys_.worker(worker.worker_id),
                                        keys_.held_tasks(worker.worker_id)],
                       [keys_.task_prefix, worker.worker_id, middle, b'j{"y":1}', b""])
        log = [e for e in raw.slowlog_get(1000) if b"EVALSHA" in (e["command"] or b"")[:8].upper()]
        print(f"re-sent finish of the middle row: {max([e['duration'] for e in log] or [0]) / 1000:.2f} ms (0: < 1 ms)")
        raw.slowlog_reset()
        batch = random.Random(2).sample(order_keys, 1000)  # push_results of 1000 keys, re-sent after a lost reply
        args = [keys_.task_prefix, worker.worker_id]
        for key in batch:
            args += [key, b'j{"y":1}', b""]
        worker._script("FINISH_TASKS", [keys_.running, keys_.finished, keys_.worker(worker.worker_id),
                                        keys_.held_tasks(worker.worker_id)], args)
        log = [e for e in raw.slowlog_get(1000) if b"EVALSHA" in (e["command"] or b"")[:8].upper()]
        print(f"re-sent finish of 1000 scattered keys: {max([e['duration'] for e in log] or [0]) / 1000:.1f} ms")
        assert frame["y"].notna().all()
        worker.close()
    finally:
        stop(process)


if __name__ == "__main__":
    main()
