"""Vignette example 3: asynchronous decentralized Bayesian optimization (ADBO) on Branin.

25 initial points are queued; workers pop and evaluate them, then each worker repeatedly fits a
random-forest surrogate on running (y imputed with the mean) and finished tasks and evaluates the
best of 1000 random candidates by a lower confidence bound with its own lambda in [0.01, 10].
"""

from __future__ import annotations

import random
from typing import Any

from ..frames import short_ids
from . import branin, require, run_example

bo_n_tasks = 100


def wl_bayesian_optimization(rush) -> None:
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    while (task := rush.pop_task()) is not None:
        rush.push_results(task.key, [{"y": branin(**task.xs)}])
    lam = random.uniform(0.01, 10)
    rng = np.random.default_rng()
    while rush.n_finished_tasks < bo_n_tasks and not rush.terminated:  # noqa: F821 - a global
        data = rush.fetch_tasks_with_state(states=["running", "finished"])
        data["y"] = data["y"].fillna(data["y"].mean()) if "y" in data else 0.0
        forest = RandomForestRegressor(n_estimators=50, min_samples_leaf=2, n_jobs=1)
        forest.fit(data[["x1", "x2"]].to_numpy(), data["y"].to_numpy())
        candidates = np.column_stack([rng.uniform(-5, 10, 1000), rng.uniform(0, 15, 1000)])
        per_tree = np.stack([tree.predict(candidates) for tree in forest.estimators_])
        bound = per_tree.mean(axis=0) - lam * per_tree.std(axis=0)
        x1, x2 = candidates[int(np.argmin(bound))]
        xs = {"x1": float(x1), "x2": float(x2)}
        key = rush.push_running_tasks([xs])
        rush.push_results(key, [{"y": branin(**xs)}])


def run(rush, n_workers: int = 4, n_tasks: int = 100, n_initial: int = 25, launcher: str = "local",
        progress: bool | None = None, **options: Any):
    require("sklearn", "numpy")
    rush.push_tasks([{"x1": random.uniform(-5, 10), "x2": random.uniform(0, 15)} for _ in range(n_initial)])
    ids, elapsed = run_example(rush, wl_bayesian_optimization, n_workers, n_tasks, launcher, progress,
                               {"bo_n_tasks": n_tasks}, modules=["sklearn.ensemble"], **options)
    tasks = rush.fetch_finished_tasks()
    initial = tasks.head(n_initial)["y"].min()
    tasks = tasks.sort_values("y")
    print(short_ids(tasks[["x1", "x2", "y", "worker_id"]].head(10)).to_string(index=False))
    best = tasks.iloc[0]
    print(f"best y = {best.y:.4f} at x1 = {best.x1:.3f}, x2 = {best.x2:.3f} (optimum 0.3979; best of the "
          f"{n_initial} random initial points: {initial:.4f}); {len(tasks)} tasks by {len(ids)} workers "
          f"in {elapsed:.2f} s")
    return tasks


if __name__ == "__main__":
    from ..cli import demo_main

    demo_main("bayesian-optimization")
