"""Vignette example 2: median stopping for XGBoost on mtcars.

Each worker draws max_depth, lambda and alpha, trains 5 more boosting rounds at a time (5..20) and
after each step compares its test RMSE to the median RMSE of all finished tasks with the same number
of rounds; a configuration worse than that median is abandoned.
"""

from __future__ import annotations

import random
import statistics
from importlib import resources
from typing import Any

from . import require, run_example

ms_n_tasks = 1000


def load_mtcars():
    import pandas as pd

    with resources.files("rush_hpc.examples").joinpath("mtcars.csv").open() as handle:
        return pd.read_csv(handle)


def wl_median_stopping(rush) -> None:
    import numpy as np
    import xgboost as xgb

    data = load_mtcars()
    train = np.random.default_rng(7).random(len(data)) < 2 / 3  # the same split on every worker
    features = data.drop(columns=["model", "mpg"])
    dtrain = xgb.DMatrix(features[train], label=data.mpg[train])
    dtest = xgb.DMatrix(features[~train], label=data.mpg[~train])
    while rush.n_finished_tasks < ms_n_tasks and not rush.terminated:  # noqa: F821 - a global
        params = {"max_depth": random.randint(1, 20), "lambda": random.uniform(0, 1),
                  "alpha": random.uniform(0, 1)}
        model = None
        for rounds in range(5, 21, 5):
            key = rush.push_running_tasks([{**params, "nrounds": rounds}])
            model = xgb.train({**params, "verbosity": 0, "nthread": 1}, dtrain, num_boost_round=5,
                              xgb_model=model)
            rmse = float(np.sqrt(np.mean((model.predict(dtest) - dtest.get_label()) ** 2)))
            rush.push_results(key, [{"rmse": rmse}])
            tasks = rush.fetch_finished_tasks()
            same = tasks.loc[tasks.nrounds == rounds, "rmse"]
            if rmse > statistics.median(same):
                break


def run(rush, n_workers: int = 4, n_tasks: int = 1000, launcher: str = "local", progress: bool | None = None,
        **options: Any):
    require("xgboost", "numpy")
    ids, elapsed = run_example(rush, wl_median_stopping, n_workers, n_tasks, launcher, progress,
                               {"ms_n_tasks": n_tasks}, modules=["xgboost"], **options)
    tasks = rush.fetch_finished_tasks().sort_values("rmse")
    print(tasks[["max_depth", "lambda", "alpha", "nrounds", "rmse"]].head(10).to_string(index=False))
    per_round = tasks.groupby("nrounds")["rmse"].agg(["count", "median", "min"])
    print("evaluations and RMSE per number of rounds (stopped configurations never reach 20):")
    print(per_round.to_string())
    best = tasks.iloc[0]
    print(f"best rmse = {best.rmse:.3f} (max_depth {best.max_depth}, {best.nrounds} rounds)\n"
          f"{len(tasks)} tasks by {len(ids)} workers in {elapsed:.2f} s")
    return tasks


if __name__ == "__main__":
    from ..cli import demo_main

    demo_main("median-stopping")
