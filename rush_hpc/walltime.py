"""When does this worker's allocation end? (SLURM walltime, or a deadline given in the environment.)

A worker that knows its end stops taking tasks it cannot finish: ``rush.time_left`` and
``rush.near_walltime`` let a loop decide, ``pop_task`` returns nothing near the end, and the worker
ends "terminated" with reason "walltime" instead of being killed mid-task by the scheduler.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from datetime import datetime
from typing import Mapping

logger = logging.getLogger(__name__)

#: the worker stops taking tasks this many seconds before its allocation ends (unless configured)
DEFAULT_WALLTIME_MARGIN = 60.0
END_ENV = "RUSH_HPC_JOB_END"


def job_end_time(environ: Mapping[str, str] | None = None) -> float | None:
    """The end of this worker's allocation (epoch seconds), or None when there is none or it is unknown.

    ``RUSH_HPC_JOB_END`` (epoch seconds; any scheduler, or tests), else ``SLURM_JOB_END_TIME`` (newer
    SLURM), else ``squeue -j $SLURM_JOB_ID -o %e`` (one call at start-up).
    """
    env = os.environ if environ is None else environ
    for name in (END_ENV, "SLURM_JOB_END_TIME"):
        value = env.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                logger.warning("ignoring %s=%r: not epoch seconds", name, value)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id or not job_id.isdigit():
        return None
    try:
        output = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("cannot ask squeue for the end of job %s: %s", job_id, error)
        return None
    return parse_slurm_time(output)


def parse_slurm_time(text: str) -> float | None:
    """``2026-11-26T09:30:00`` (local time, as squeue prints it) -> epoch seconds; None for N/A."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def walltime_margin(configured: float | str | None, end: float | None) -> float:
    """The configured margin; by default 60 s, but at most a quarter of what is left at start-up (a
    5-minute job stops taking tasks 60 s before its end, a 1-minute job 15 s before)."""
    if configured:
        return float(configured)
    left = seconds_left(end)
    return DEFAULT_WALLTIME_MARGIN if left is None else max(0.0, min(DEFAULT_WALLTIME_MARGIN, left / 4))


def seconds_left(end: float | None) -> float | None:
    return None if end is None else end - time.time()
