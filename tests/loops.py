"""Worker loops shared by the tests (one place, so test files do not grow their own copies).

Registered with cloudpickle by value: the tests directory is not importable on the workers.
"""

from __future__ import annotations

import logging
import random
import sys
import time

import cloudpickle

from rush_hpc.examples import branin

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: heartbeat settings that make lost workers show up within about a second
FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}


def wl_random_search(rush):
    """The vignette loop: create, evaluate and finish tasks until 100 are finished."""
    while rush.n_finished_tasks < 100:
        xs = {"x1": random.uniform(-5, 10), "x2": random.uniform(0, 15)}
        key = rush.push_running_tasks([xs])
        rush.push_results(key, [{"y": branin(**xs)}])


def wl_queue_slow(rush):
    """Pop queued tasks and sleep ``xs["sleep"]`` seconds for each, until asked to terminate."""
    while not rush.terminated:
        task = rush.pop_task(timeout=0.1)
        if task is not None:
            time.sleep(task.xs["sleep"])
            rush.push_results(task.key, [{"y": task.xs["sleep"]}])


def wl_until_terminated(rush):
    """Log one line, then idle until asked to terminate."""
    logging.getLogger("user.loop").info("hello from the loop")
    while not rush.terminated:
        time.sleep(0.02)


def wl_raises(rush):
    """Hold a task and raise: the worker fails, its task with it."""
    rush.push_running_tasks([{"x": 1}])
    raise ValueError("objective exploded")


def wl_hold(rush):
    """Hold one task until asked to terminate, then finish it."""
    key = rush.push_running_tasks([{"x": 1}])
    while not rush.terminated:
        time.sleep(0.1)
    rush.push_results(key, [{"y": 1}])
