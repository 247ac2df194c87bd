"""The rush vignette's three examples, runnable after ``pip install``:

* ``random_search``          random search on Branin, 4 workers, 100 tasks
* ``median_stopping``        XGBoost on mtcars with median stopping, 1000 tasks (extra: examples)
* ``bayesian_optimization``  asynchronous decentralized Bayesian optimization (extra: examples)

``rush-hpc demo NAME`` or ``python -m rush_hpc.examples.NAME`` runs one.
"""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Any, Callable, Sequence

from .. import progress as progress_display
from ..controller import Rush
from ..exceptions import ConfigError

EXAMPLES = ("random-search", "median-stopping", "bayesian-optimization")


def branin(x1: float, x2: float) -> float:
    """The Branin function; global minimum 0.397887 at (-pi, 12.275), (pi, 2.275), (9.42478, 2.475)."""
    return ((x2 - 5.1 / (4 * math.pi ** 2) * x1 ** 2 + 5 / math.pi * x1 - 6) ** 2
            + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10)


def require(*modules: str) -> None:
    """A clear message when an example's optional dependencies are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this example needs {', '.join(missing)}: pip install 'rush-hpc[examples]'")


def start_workers(rush: Rush, loop: Callable[..., Any], n_workers: int, launcher: str = "local",
                  globals: dict[str, Any] | None = None, **options: Any) -> list[str]:
    """Start the example's workers with the chosen launcher; local by default."""
    if launcher == "local":
        return rush.start_local_workers(loop, n_workers=n_workers, globals=globals, **options)
    if launcher == "ssh":
        hosts: Sequence[str] = options.pop("hosts")
        return rush.start_ssh_workers(loop, hosts=hosts, n_workers=n_workers, globals=globals, **options)
    if launcher == "slurm":
        return rush.start_slurm_workers(loop, n_workers=n_workers, globals=globals, **options)
    raise ConfigError(f"launcher must be local, ssh or slurm, got {launcher!r}")


def run_example(rush: Rush, loop: Callable[..., Any], n_workers: int, n_tasks: int, launcher: str,
                progress: bool | None, globals: dict[str, Any], quiet: bool = False,
                **options: Any) -> tuple[list[str], float]:
    """Start the workers, wait until they are done, print the summary; returns (ids, seconds).

    ``progress``: a progress bar on stderr (None: on a terminal only, see ``rush_hpc.progress``).
    """
    started = time.monotonic()
    ids = start_workers(rush, loop, n_workers, launcher, globals=globals, **options)
    rush.wait_for_workers(worker_ids=ids, timeout=120)
    wait_for_finished(rush, n_tasks, ids, progress=progress)
    if not quiet:
        print(rush)
    return ids, time.monotonic() - started


def wait_for_finished(rush: Rush, n_tasks: int, ids: Sequence[str], timeout: float = 600,
                      progress: bool | None = None) -> None:
    """Wait until ``n_tasks`` tasks finished or every worker ended (reporting failures)."""
    deadline = time.monotonic() + timeout
    with progress_display.tracker(total=n_tasks, description="finished", progress=progress) as bar:
        while True:
            counts = rush.counts()
            bar.update(done=min(counts["finished"], n_tasks),
                       extra=f"{counts['running_workers']} workers · {counts['running']} running · "
                             f"{counts['failed']} failed")
            ended = set(rush._ids_in_state("terminated", "failed", "lost", "killed"))
            if set(ids) <= ended or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    failed = rush._ids_in_state("failed")
    if failed:
        reasons = rush.worker_info.set_index("worker_id").loc[failed, "reason"]
        raise RuntimeError("workers failed:\n" + "\n".join(f"{w}: {r}" for w, r in reasons.items()))
