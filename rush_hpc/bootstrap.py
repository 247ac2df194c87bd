"""What every launched worker runs first, whatever launched it (local, SSH, SLURM, a script).

connect -> check environment -> import modules -> verify + unpickle the loop -> register ->
heartbeat -> run the loop -> terminated | failed. Any error on the way is recorded in Redis (the
worker's hash and the network log) and printed to stderr, so the controller can show it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

from .config import RedisConfig
from .credentials import CREDENTIALS_ENV, read_credentials, resolve_secret
from .exceptions import ConfigError, RushError, WorkerNotRunningError
from .heartbeat import Heartbeat, HeartbeatProcess, first_beat, make_heartbeat
from .logs import RedisLogHandler
from .payload import BATCH_ENV, load_meta, load_payload
from .walltime import job_end_time, walltime_margin
from .worker import RushWorker

logger = logging.getLogger(__name__)

# Signals that mean "stop soon": SLURM's --signal before the time limit, scancel, a polite kill.
GRACEFUL_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
#: what the job script templates ask SLURM to send before the time limit (--signal=B:USR2@delay)
WALLTIME_SIGNAL = signal.SIGUSR2


def _launch_context() -> dict[str, Any]:
    """What the environment tells about how this worker was started."""
    env = os.environ
    job_id = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"launcher": env.get("RUSH_HPC_LAUNCHER", "script"), "job_id": job_id,
            "node": env.get("SLURMD_NODENAME")}


def _credentials() -> tuple[RedisConfig, bytes | None]:
    if os.environ.get(CREDENTIALS_ENV):
        return read_credentials(os.environ[CREDENTIALS_ENV])
    config = RedisConfig.from_env()
    if config is None:
        raise ConfigError(f"the worker needs Redis credentials: set {CREDENTIALS_ENV} to a credentials "
                          "file, or RUSH_HPC_URL (and RUSH_HPC_SECRET)")
    return config, resolve_secret(create=False)


def _record_failure(rush: RushWorker, stage: str, error: BaseException) -> None:
    """The worker failed: record why, and release its tasks, in one step."""
    message = f"{stage}: {type(error).__name__}: {error}"
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    print(f"rush-hpc worker {rush.worker_id}: {message}", file=sys.stderr, flush=True)
    logger.error("worker %s failed: %s\n%s", rush.worker_id, message, trace)  # in the log before it counts as failed
    try:
        _end(rush, "failed", ("", "launched", "running"), f"worker {rush.worker_id} failed: {message}",
             reason=message, traceback=trace)
    except Exception as redis_error:  # noqa: BLE001 - best effort, Redis may be the problem
        print(f"rush-hpc worker {rush.worker_id}: could not record the failure in Redis: {redis_error}",
              file=sys.stderr, flush=True)


def _end(rush: RushWorker, state: str, allowed: tuple[str, ...], message: str, **fields: str) -> None:
    """End the worker and hand back its running tasks and priority queue in ONE atomic step."""
    ended = rush.end_worker(rush.worker_id, state, allowed, message, ended_at=f"{time.time():.3f}", **fields)
    if ended and (ended[1] or ended[2]):
        logger.warning("worker %s ended with %d running task(s) (%d failed, %d requeued): %s",
                       rush.worker_id, len(ended[1]) + len(ended[2]), len(ended[1]), len(ended[2]), message)


def run_worker(network: str, worker_id: str, config: RedisConfig | None = None,
               secret: bytes | None = None, *, in_process: bool = False, reraise: bool = False,
               batch: str | None = None) -> int:
    """Run one worker to its end; returns the process exit code (0 terminated, 1 failed, 3 refused).

    ``reraise``: an exception of the loop is recorded (the worker fails, its tasks are released) and
    then raised again, with its traceback (the in-process launcher, for debugging).
    """
    if config is None:
        config, secret = _credentials()
    rush = RushWorker(network, config=config, worker_id=worker_id, secret=secret)
    root = logging.getLogger()
    handler: RedisLogHandler | None = None
    heartbeat: Heartbeat | HeartbeatProcess | None = None
    try:
        meta = load_meta(rush, batch or os.environ.get(BATCH_ENV) or None)  # this start call's loop
        settings = meta.get("settings", {})
        level = logging.getLevelName(str(settings.get("log_level", "INFO")).upper())
        handler = RedisLogHandler(rush.redis, rush.keys.log, worker_id, level=level)
        retry = rush._retry
        handler.addFilter(lambda record: not retry.in_outage)  # stderr only while Redis is down
        root.addHandler(handler)
        if root.level > level or root.level == logging.NOTSET:
            root.setLevel(level)
        outage_timeout = float(settings.get("redis_outage_timeout") or config.outage_timeout)
        rush.set_outage_timeout(outage_timeout)
        period = settings.get("heartbeat_period")
        expire = settings.get("heartbeat_expire")
        if period:  # forked before the loop is unpickled: the child shares none of its objects
            heartbeat = make_heartbeat(rush, period, expire, outage_timeout, in_process=in_process)
        loop, _ = load_payload(rush, meta)
        if not in_process:
            for signum in GRACEFUL_SIGNALS:
                signal.signal(signum, lambda signum, frame: _on_signal(rush, signum))
        if period:
            first_beat(rush, expire)  # the key exists before the worker counts as running
        rush.job_end = job_end_time()
        rush.walltime_margin = walltime_margin(settings.get("walltime_margin"), rush.job_end)
        # in-process, the environment describes the controller's process (maybe a SLURM job of its own)
        context = {"launcher": "inline"} if in_process else _launch_context()
        rush.register(**context, heartbeat_period=period, heartbeat_expire=expire,
                      job_end=f"{rush.job_end:.0f}" if rush.job_end else None)
    except WorkerNotRunningError as error:  # killed (or reset) before it could register
        print(f"rush-hpc worker {worker_id}: {error}", file=sys.stderr, flush=True)
        _bootstrap_cleanup(rush, heartbeat, root, handler)
        return 3
    except BaseException as error:  # noqa: BLE001 - every bootstrap error goes to Redis
        _record_failure(rush, "worker bootstrap failed", error)
        _bootstrap_cleanup(rush, heartbeat, root, handler)
        return 1

    if heartbeat:
        heartbeat.begin()
        rush._heartbeat = heartbeat
    code = 0
    try:
        loop(rush)
        walltime = rush.walltime_signalled or (rush.job_end is not None and rush.near_walltime)
        _end(rush, "terminated", ("running",), f"worker {worker_id} terminated while the task was running",
             **({"reason": "walltime"} if walltime else {}))
        logger.info("worker %s terminated", worker_id)
    except WorkerNotRunningError as error:
        logger.warning("%s", error)  # the controller ended it and released its tasks already
        code = 3
    except BaseException as error:  # noqa: BLE001
        _record_failure(rush, "worker loop raised", error)
        code = 1
        if reraise:
            raise
    finally:
        if heartbeat:
            heartbeat.stop()
        root.removeHandler(handler)
        rush.close()
    return code


def _bootstrap_cleanup(rush: RushWorker, heartbeat: Heartbeat | HeartbeatProcess | None,
                       root: logging.Logger, handler: RedisLogHandler | None) -> None:
    if isinstance(heartbeat, HeartbeatProcess):
        heartbeat.stop()  # never started beating; this reaps the waiting child
    if handler:
        root.removeHandler(handler)
    rush.close()


def _on_signal(rush: RushWorker, signum: int) -> None:
    logger.warning("worker %s got %s: terminating after the current task", rush.worker_id,
                   signal.Signals(signum).name)
    if signum == WALLTIME_SIGNAL:
        rush.walltime_signalled = True
    rush.terminate()


def main(network: str, worker_id: str) -> None:
    """Process entry point (``rush-hpc worker`` / ``python -m rush_hpc worker``)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = run_worker(network, worker_id)
    except RushError as error:
        print(f"rush-hpc worker {worker_id}: {error}", file=sys.stderr, flush=True)
        code = 2
    sys.exit(code)
