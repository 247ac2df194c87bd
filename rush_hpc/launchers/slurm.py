"""Workers as SLURM jobs: ``SlurmJobs`` (the scheduler's view, shared by both SLURM launchers) and
``SubmititLauncher`` (one job array through submitit).

The scheduler's truth comes from ``sacct`` (accounting must be on; submitit needs it too): a job
that ended TIMEOUT, PREEMPTED, OUT_OF_MEMORY, NODE_FAIL, CANCELLED or FAILED gives that reason to
its worker and to the worker's running tasks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..exceptions import CommandError, ConfigError, LaunchError
from .base import Launcher, WorkerCommand, WorkerInfo, call, read_tail

logger = logging.getLogger(__name__)

ENDED_STATES = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED")


def time_to_minutes(value: str | int | None) -> int | None:
    """SLURM time (``"MM"``, ``"HH:MM:SS"``, ``"D-HH:MM"``...) or minutes as int -> minutes."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not match:
        raise ConfigError(f"time must be minutes or 'D-HH:MM:SS', got {value!r}")
    days, first, second, third = match.groups()
    if second is None:
        hours, minutes, seconds = (0, int(first), 0) if days is None else (int(first), 0, 0)
    elif third is None:
        hours, minutes, seconds = (int(first), int(second), 0) if days else (0, int(first), int(second))
    else:
        hours, minutes, seconds = int(first), int(second), int(third)
    return max(1, int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0))


class SlurmJobs(Launcher):
    """The scheduler's view of workers that run as SLURM jobs (``job_id`` in their info)."""

    name = "slurm"
    always_force_kill = True  # scancel frees the allocation even when the worker already exited

    def __init__(self) -> None:
        self._cache: tuple[float, dict[str, str]] = (0.0, {})

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        raise NotImplementedError("use SubmititLauncher or SbatchLauncher")

    def job_states(self, job_ids: Sequence[str], max_age: float = 1.0) -> dict[str, str]:
        """``{job_id: STATE}`` from sacct (array tasks as ``123_4``); cached for ``max_age`` s."""
        stamp, cached = self._cache
        if time.monotonic() - stamp < max_age and all(j in cached for j in job_ids):
            return cached
        arrays = sorted({j.split("_")[0] for j in job_ids})
        try:
            output = call(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)], timeout=30)
        except CommandError as error:
            logger.warning("sacct failed, SLURM job states unknown: %s", error)
            return {}
        states: dict[str, str] = {}
        for line in output.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
        self._cache = (time.monotonic(), states)
        return states

    def gone(self, infos: Mapping[str, WorkerInfo]) -> dict[str, str]:
        jobs = {w: i["job_id"] for w, i in infos.items() if i.get("job_id")}
        if not jobs:
            return {}
        states = self.job_states(list(jobs.values()))
        return {w: f"SLURM job {job} ended {states[job]}" for w, job in jobs.items()
                if states.get(job) in ENDED_STATES}

    def kill(self, infos: Mapping[str, WorkerInfo]) -> None:
        jobs = sorted({i["job_id"] for i in infos.values() if i.get("job_id")})
        if jobs:
            try:
                call(["scancel", *jobs], timeout=30)
            except CommandError as error:
                logger.warning("scancel failed: %s", error)

    def output_tail(self, info: WorkerInfo, lines: int = 20) -> str:
        return read_tail(info.get("stderr"), lines) or read_tail(info.get("stdout"), lines)


def run_submitit_worker(network: str, worker_id: str, credentials: str) -> int:
    """What each submitit array task runs (in submitit's process, on the node)."""
    os.environ["RUSH_HPC_LAUNCHER"] = "slurm"
    os.environ["RUSH_HPC_CREDENTIALS"] = credentials
    import logging as _logging

    from ..bootstrap import run_worker
    from ..credentials import read_credentials

    _logging.basicConfig(level=_logging.INFO, stream=sys.stderr)
    config, secret = read_credentials(credentials)
    return run_worker(network, worker_id, config, secret)


class SubmititLauncher(SlurmJobs):
    """One submitit job array for all workers; submitit's own parameter names are accepted too."""

    name = "slurm"

    def __init__(self, log_dir: str | os.PathLike[str], *, partition: str | None = None,
                 time: str | int | None = "01:00:00", cpus_per_worker: int = 1, mem: str | None = None,
                 account: str | None = None, qos: str | None = None, gpus: int | None = None,
                 max_parallel: int | None = None, setup: Sequence[str] = (),
                 additional_parameters: Mapping[str, Any] | None = None, python: str | None = None,
                 signal_delay_s: int = 90, **submitit_parameters: Any) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.python = python or sys.executable
        parameters: dict[str, Any] = {
            "partition": partition, "time": time_to_minutes(time), "cpus_per_task": cpus_per_worker,
            "mem": mem, "account": account, "qos": qos, "gpus_per_node": gpus,
            "setup": list(setup), "additional_parameters": dict(additional_parameters or {}),
            "signal_delay_s": signal_delay_s, "job_name": "rush-worker", **submitit_parameters}
        self.max_parallel = max_parallel
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    def executor(self, n_workers: int):
        import submitit

        executor = submitit.SlurmExecutor(folder=self.log_dir / "submitit" / "%j", python=self.python)
        try:
            executor.update_parameters(array_parallelism=self.max_parallel or n_workers, **self.parameters)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"invalid SLURM parameter: {error}") from None
        return executor

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        executor = self.executor(len(worker_ids))
        credentials = command.env["RUSH_HPC_CREDENTIALS"]
        try:
            jobs = executor.map_array(run_submitit_worker, [command.network] * len(worker_ids),
                                      list(worker_ids), [credentials] * len(worker_ids))
        except Exception as error:  # noqa: BLE001 - submitit wraps sbatch failures in several ways
            raise LaunchError(f"submitting the SLURM job array failed: {error}") from None
        return {w: {"launcher": self.name, "job_id": job.job_id, "stdout": str(job.paths.stdout),
                    "stderr": str(job.paths.stderr)} for w, job in zip(worker_ids, jobs)}
