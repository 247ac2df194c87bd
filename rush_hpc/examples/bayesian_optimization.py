"""Vignette example 3: asynchronous decentralized Bayesian optimization (ADBO) on Branin.

As in the rush vignette: a Latin hypercube of ``n_initial`` points is queued, workers pop and
evaluate them; then each worker, on its own and without waiting for the others, repeatedly

1. reads the running and finished tasks in one snapshot (``fetch_tasks_with_state``) and imputes
   the unknown ``y`` of running tasks with the mean of the finished ones, so that a point another
   worker is evaluating looks mediocre and is not proposed again;
2. fits a surrogate: a Gaussian process (Matern 5/2, inputs scaled to the unit square) - the
   vignette's random forest needs many more points on a smooth function like Branin;
3. minimizes the lower confidence bound ``mean - lambda * sd`` over 1000 candidates drawn from the
   whole space plus 200 around the best point found so far (a local search), with the worker's own
   ``lambda`` drawn once from an exponential distribution (mean 1.96, as in ADBO): some workers
   explore, others exploit;
4. evaluates the chosen point as a running task and pushes the result.

``python scripts/bench.py --bo`` compares it with random search at the same budget over 20 seeds.
"""

from __future__ import annotations

import random
from typing import Any

from ..frames import short_ids
from . import branin, require, run_example

bo_n_tasks = 100
bo_seed: int | None = None
bo_lambda_mean = 1.96
BOUNDS = ((-5.0, 10.0), (0.0, 15.0))


def wl_bayesian_optimization(rush) -> None:
    import time
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # one BLAS thread per worker: workers already use every core
    while (task := rush.pop_task()) is not None:  # the initial design
        rush.push_results(task.key, [{"y": branin(**task.xs)}])
    entropy = None if bo_seed is None else [bo_seed, int(rush.worker_id[:8], 16)]  # noqa: F821 - globals
    rng = np.random.default_rng(entropy)
    lam = rng.exponential(bo_lambda_mean)  # noqa: F821
    lower, upper = np.array([b[0] for b in BOUNDS]), np.array([b[1] for b in BOUNDS])
    while rush.n_finished_tasks < bo_n_tasks and not rush.terminated:  # noqa: F821
        data = rush.fetch_tasks_with_state(states=["running", "finished"])
        finished = (data["state"] == "finished").to_numpy() if "state" in data else np.zeros(0, bool)
        if not finished.any():  # the others still evaluate the initial design
            time.sleep(0.05)
            continue
        y = data["y"].to_numpy(dtype=float, copy=True)
        y[~finished] = y[finished].mean()
        unit = (data[["x1", "x2"]].to_numpy(dtype=float) - lower) / (upper - lower)
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * Matern([0.3, 0.3], (1e-2, 10.0), nu=2.5)
                  + WhiteKernel(1e-6, (1e-9, 1e-2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            surrogate = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(unit, y)
        best = unit[finished][np.argmin(y[finished])]
        candidates = np.vstack([rng.uniform(size=(1000, 2)),
                                np.clip(best + rng.normal(scale=0.05, size=(200, 2)), 0.0, 1.0)])
        mean, sd = surrogate.predict(candidates, return_std=True)
        x1, x2 = lower + candidates[int(np.argmin(mean - lam * sd))] * (upper - lower)
        xs = {"x1": float(x1), "x2": float(x2)}
        key = rush.push_running_tasks([xs])
        rush.push_results(key, [{"y": branin(**xs)}])


def latin_hypercube(n: int, rng: random.Random) -> list[dict[str, float]]:
    """``n`` points, one in each of ``n`` equal slices of every dimension (the vignette uses an LHS)."""
    columns = []
    for low, high in BOUNDS:
        strata = list(range(n))
        rng.shuffle(strata)
        columns.append([low + (high - low) * (s + rng.random()) / n for s in strata])
    return [{"x1": a, "x2": b} for a, b in zip(*columns)]


def run(rush, n_workers: int = 4, n_tasks: int = 100, n_initial: int = 25, launcher: str = "local",
        progress: bool | None = None, seed: int | None = None, quiet: bool = False, **options: Any):
    """Run ADBO on ``rush``; returns the finished tasks in the order they finished.

    ``seed`` makes the initial design and each worker's random numbers repeatable (the order in
    which asynchronous workers finish is not); ``quiet`` skips the printout.
    """
    require("sklearn", "numpy")
    rush.push_tasks(latin_hypercube(n_initial, random.Random(seed)))
    ids, elapsed = run_example(rush, wl_bayesian_optimization, n_workers, n_tasks, launcher, progress,
                               {"bo_n_tasks": n_tasks, "bo_seed": seed, "bo_lambda_mean": bo_lambda_mean},
                               modules=["sklearn.gaussian_process"], quiet=quiet, **options)
    tasks = rush.fetch_finished_tasks()
    if not quiet:
        initial = tasks.head(n_initial)["y"].min()
        ranked = tasks.sort_values("y")
        print(short_ids(ranked[["x1", "x2", "y", "worker_id"]].head(10)).to_string(index=False))
        best = ranked.iloc[0]
        print(f"best y = {best.y:.4f} at x1 = {best.x1:.3f}, x2 = {best.x2:.3f} (optimum 0.3979)\n"
              f"best of the {n_initial} initial points: {initial:.4f}\n"
              f"{len(tasks)} tasks by {len(ids)} workers in {elapsed:.2f} s")
    return tasks


if __name__ == "__main__":
    from ..cli import demo_main

    demo_main("bayesian-optimization")
