"""Vignette example 1: random search on Branin with 4 workers, stopping at 100 finished tasks."""

from __future__ import annotations

import random
from typing import Any

from ..frames import short_ids
from . import branin, run_example


def wl_random_search(rush) -> None:
    while rush.n_finished_tasks < rush_n_tasks and not rush.terminated:  # noqa: F821 - a global
        xs = {"x1": random.uniform(-5, 10), "x2": random.uniform(0, 15)}
        key = rush.push_running_tasks([xs])
        rush.push_results(key, [{"y": branin(**xs)}])


rush_n_tasks = 100


def run(rush, n_workers: int = 4, n_tasks: int = 100, launcher: str = "local", progress: bool | None = None,
        quiet: bool = False, **options: Any):
    """Run the example on ``rush``; prints the summary and the best rows, returns the finished tasks
    (sorted by y; ``quiet``: in the order they finished, nothing printed)."""
    ids, elapsed = run_example(rush, wl_random_search, n_workers, n_tasks, launcher, progress,
                               {"rush_n_tasks": n_tasks}, quiet=quiet, **options)
    if quiet:
        return rush.fetch_finished_tasks()
    tasks = rush.fetch_finished_tasks().sort_values("y")
    print(short_ids(tasks[["x1", "x2", "y", "worker_id"]].head(10)).to_string(index=False))
    best = tasks.iloc[0]
    print(f"best y = {best.y:.4f} at x1 = {best.x1:.3f}, x2 = {best.x2:.3f} (optimum 0.3979)\n"
          f"{len(tasks)} tasks by {len(ids)} workers in {elapsed:.2f} s")
    return tasks


if __name__ == "__main__":
    from ..cli import demo_main

    demo_main("random-search")
