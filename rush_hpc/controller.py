"""``Rush``, the controller: starts workers (one start path for every launcher) and answers questions.

Watching, waiting for, finding lost, killing and reaping workers is the supervisor's job
(``supervisor.py``); worker states and their allowed transitions are in ``states.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import redis

from . import defaults
from . import heartbeat as heartbeat_settings
from .config import RedisConfig, resolve_config
from .credentials import (CREDENTIALS_ENV, Removable, create_credentials_file, credentials_blob,
                          resolve_secret, write_credentials)
from .exceptions import ConfigError, LaunchError, RushError
from .launchers.base import Handle, Launcher, WorkerCommand
from .launchers.local import LocalLauncher
from .launchers.login import CONNECTION_OPTIONS, LoginCredentials, LoginNode
from .logs import read_log
from .frames import format_local
from .network import RushNetwork, text
from .payload import BATCH_ENV, GlobalsArg, resolve_globals, store_payload
from .server import EmbeddedRedis
from .states import ACTIVE, WorkerState, set_worker_state
from .supervisor import Supervisor

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: workers of an embedded Redis give up quickly: it is only gone when its controller is
EMBEDDED_OUTAGE_TIMEOUT = 5.0


class WorkerIds(list[str]):
    """``rush.worker_ids``: every worker id, sorted (a list, as always); call it to filter by
    state: ``rush.worker_ids(state="running")``, ``rush.worker_ids(state=["failed", "lost"])``."""

    def __init__(self, ids: Iterable[str], supervisor: Supervisor) -> None:
        super().__init__(ids)
        self._supervisor = supervisor

    def __call__(self, state: WorkerState | str | Iterable[WorkerState | str] | None = None) -> list[str]:
        if state is None:
            return self._supervisor.worker_ids()
        states = [state] if isinstance(state, str) else list(state)
        return self._supervisor.worker_ids(*states) if states else []


def positive_count(n_workers: Any) -> int:
    """Any integral number (``np.int64(2)`` too) that is at least 1."""
    try:
        count = operator.index(n_workers)
    except TypeError:
        raise ConfigError(f"n_workers must be a positive integer, got {n_workers!r}") from None
    if isinstance(n_workers, bool) or count < 1:
        raise ConfigError(f"n_workers must be a positive integer, got {n_workers!r}")
    return count


class Rush(RushNetwork):
    """The controller of a network. Create it with ``rush_hpc.rsh()``."""

    def __init__(self, network: str, config: RedisConfig, secret: bytes | None,
                 embedded: EmbeddedRedis | None = None, worker_address: str | None = None) -> None:
        super().__init__(network, config, secret)
        #: how the workers reach Redis (what their credentials say): ``config`` unless rsh got a
        #: ``worker_address`` (the controller reaches Redis through a tunnel, the workers do not)
        self.worker_config = with_address(config, worker_address)
        self._embedded = embedded
        self._supervisor = Supervisor(self)
        self._log_dir: Path | None = None  # our private temporary directory (removed by close/reset)
        self._log_dir_users: set[str] = set()  # ids of the workers started with it
        self._closed = False
        self._adapt: Any = None
        self._batches = threading.local()  # per thread: adapt's thread stores and starts its own
        self._credential_files: list[tuple[Removable, list[str]]] = []
        self._credentials_lock = threading.Lock()  # the monitor thread removes them too
        self._in_flight = 0  # start calls under way (adapt's thread): close() lets them finish first
        self._flight = threading.Condition()
        self._logins: dict[Any, LoginNode] = {}  # SLURM login nodes (one shared SSH connection each)

    # -- starting workers -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RushError(f"the controller of network {self.network!r} is closed; "
                            "create a new one with rush_hpc.rsh() to start workers")

    @contextlib.contextmanager
    def _start_in_flight(self) -> Iterator[None]:
        """Around a start that leaves a credentials file behind: ``close()`` waits for it, so that a
        start finishing after close() (adapt's thread in a slow sbatch) cannot leave the file."""
        with self._flight:
            self._check_open()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._flight:
                self._in_flight -= 1
                self._flight.notify_all()

    def _worker_log_dir(self, log_dir: str | Path | None) -> Path:
        if log_dir is not None:
            path = Path(log_dir).expanduser()
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            return path
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"rush-hpc-{self.network}-"))
        return self._log_dir

    def store_worker_loop(self, worker_loop: Callable[..., Any], globals: GlobalsArg = None,
                          modules: Sequence[str] = (), *, heartbeat_period: float | None = defaults.HEARTBEAT_PERIOD,
                          heartbeat_expire: float | None = defaults.HEARTBEAT_EXPIRE,
                          log_level: str = defaults.LOG_LEVEL, payload_dir: str | None = None,
                          redis_outage_timeout: float | None = None, walltime_margin: float | None = None,
                          _frame_depth: int = 2) -> None:
        """Serialize, sign and store the worker loop that every worker of this network runs.

        ``redis_outage_timeout``: how long the workers ride through a Redis outage (default: the
        controller's, see ``rsh``); ``walltime_margin``: seconds before the end of their allocation at
        which they stop taking tasks (default 60 s, at most a quarter of the allocation).
        """
        self._check_open()
        heartbeat_settings.validate(heartbeat_period, heartbeat_expire)
        meta = store_payload(self, worker_loop, resolve_globals(globals, _frame_depth + 1), modules,
                             {"heartbeat_period": heartbeat_period, "heartbeat_expire": heartbeat_expire,
                              "log_level": log_level, "redis_outage_timeout": redis_outage_timeout,
                              "walltime_margin": walltime_margin}, spill_dir=payload_dir)
        self._batches.current = meta["batch"]  # the workers this thread starts next load this loop

    def _start_in_directory(self, make_launcher: Callable[[Path], Launcher], n_workers: int,
                            log_dir: str | None) -> list[str]:
        """Launchers whose workers see this machine's files (local, SLURM with a shared ``log_dir``):
        output and the 0600 credentials file go to ``log_dir``. Credential delivery is this step."""
        count = positive_count(n_workers)
        if log_dir is not None and any(c in str(log_dir) for c in "\r\n\0"):
            raise ConfigError(f"log_dir may not contain a line break or NUL character, got {str(log_dir)!r}")
        with self._start_in_flight():
            directory = self._worker_log_dir(log_dir)
            launcher = make_launcher(directory)
            credentials = create_credentials_file(directory, self.worker_config, self.codec.secret)
            ids = self._start_with_credentials(launcher, count, credentials, str(credentials.path))
            if directory == self._log_dir:
                self._log_dir_users.update(ids)
            return ids

    def _start_with_credentials(self, launcher: Launcher, count: int, credentials: Removable,
                                path: str) -> list[str]:
        """Start workers that read the credentials file at ``path``; it is removed once they
        registered (or at once, if the start fails)."""
        command = WorkerCommand(self.network, launcher.python, {CREDENTIALS_ENV: path})
        try:
            ids = self.start_workers(launcher, count, command)
        except BaseException:
            credentials.remove()
            raise
        with self._credentials_lock:
            self._credential_files.append((credentials, ids))
        return ids

    def _remove_spent_credentials(self, everything: bool = False) -> None:
        """Delete the credentials files whose workers all registered or ended (all of them with
        ``everything``): no secret stays on disk longer than a worker may still need it."""
        with self._credentials_lock:
            keep = []
            launched = set(self._supervisor.worker_ids(WorkerState.LAUNCHED)) \
                if self._credential_files and not everything else set()
            for credentials, ids in self._credential_files:
                if everything or not launched.intersection(ids):
                    credentials.remove()
                else:
                    keep.append((credentials, ids))
            self._credential_files = keep

    def start_workers(self, launcher: Launcher, n_workers: int, command: WorkerCommand,
                      pre_info: Mapping[str, str] | None = None) -> list[str]:
        """The one start path: record ``n_workers`` ids as launched, start them, keep the handles.

        A start the launcher refuses outright (bad option, sbatch error) leaves no worker record;
        when only some workers started (an SSH host was down), the others are marked failed.
        """
        self._check_open()
        count = positive_count(n_workers)
        batch = self._batch
        command = dataclasses.replace(command, launcher=launcher.name,
                                      env={**command.env, **({BATCH_ENV: batch} if batch else {})})
        worker_ids = [uuid.uuid4().hex for _ in range(count)]
        self._supervisor.starting.update(worker_ids)  # no handle yet: the monitor leaves them alone
        try:
            handles = self._launch(launcher, worker_ids, command, pre_info)
        finally:
            self._supervisor.starting.difference_update(worker_ids)
        logger.info("started %d %s worker(s) in network %s", len(handles), launcher.name, self.network)
        return worker_ids

    def _launch(self, launcher: Launcher, worker_ids: list[str], command: WorkerCommand,
                pre_info: Mapping[str, str] | None) -> list[Handle]:
        """Record the ids as launched, start them, record their handles (see ``start_workers``)."""
        now = f"{time.time():.3f}"
        for worker_id in worker_ids:
            set_worker_state(self, worker_id, WorkerState.LAUNCHED, worker_id=worker_id,
                             launcher=launcher.name, launched_at=now, **(pre_info or {}))
        try:
            handles = launcher.start(worker_ids, command)
        except LaunchError as error:
            started = [launcher.handles[w] for w in error.started if w in launcher.handles]
            self._record(started)
            missing = [w for w in worker_ids if w not in {h.worker_id for h in started}]
            if started or error.maybe_started:  # failed: a worker that comes up later refuses to run
                for worker_id in missing:
                    set_worker_state(self, worker_id, WorkerState.FAILED, (WorkerState.LAUNCHED.value,),
                                     reason=f"launch failed: {str(error)[:500]}", ended_at=f"{time.time():.3f}")
            else:
                self._forget_records(missing)
            raise
        except BaseException:
            self._forget_records(worker_ids)
            raise
        self._record(handles)
        return handles

    def _record(self, handles: Sequence[Handle]) -> None:
        self._supervisor.add(handles)
        pipe = self.redis.pipeline(transaction=False)
        for handle in handles:
            pipe.hset(self.keys.worker(handle.worker_id), mapping=dict(handle.to_info()))  # type: ignore[arg-type]
        pipe.execute()

    def _forget_records(self, worker_ids: Sequence[str]) -> None:
        """Remove the records of workers that were never started (a refused start)."""
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.delete(self.keys.worker(worker_id))
            pipe.srem(self.keys.workers, worker_id)
            pipe.srem(self.keys.worker_state_set(WorkerState.LAUNCHED.value), worker_id)
        pipe.execute()

    def start_local_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                            globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                            heartbeat_period: float | None = defaults.HEARTBEAT_PERIOD,
                            heartbeat_expire: float | None = defaults.HEARTBEAT_EXPIRE,
                            log_level: str = defaults.LOG_LEVEL, log_dir: str | None = None,
                            payload_dir: str | None = None, python: str | None = None,
                            redis_outage_timeout: float | None = None,
                            walltime_margin: float | None = None, in_process: bool = False) -> list[str]:
        """Start ``n_workers`` worker processes on this machine; returns their ids.

        ``in_process=True`` (debugging, as submitit's DebugExecutor): no process; the workers run the
        loop here, one after the other, and the call returns when their loops returned.

        They get this process's import path (``PYTHONPATH``) and working directory. Their
        stdout/stderr go to ``log_dir`` (a private temporary directory by default, removed by
        ``close()`` / ``reset()`` once the workers are gone).
        """
        positive_count(n_workers)
        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, redis_outage_timeout=redis_outage_timeout,
                               walltime_margin=walltime_margin, _frame_depth=2)
        if in_process:
            return self._run_in_process(positive_count(n_workers))
        return self._start_in_directory(lambda d: LocalLauncher(d, python), n_workers, log_dir)

    @property
    def _batch(self) -> str | None:
        """The batch (payload) of the worker loop this thread stored last."""
        return getattr(self._batches, "current", None)

    def _run_in_process(self, n_workers: int) -> list[str]:
        """The in-process launcher, for debugging: each worker runs the stored loop right here, one
        after the other, in this thread (breakpoints work; an exception propagates with its
        traceback after the worker was recorded as failed). Same task API, same states."""
        from .bootstrap import run_worker

        worker_ids = [uuid.uuid4().hex for _ in range(n_workers)]
        for worker_id in worker_ids:
            set_worker_state(self, worker_id, WorkerState.LAUNCHED, worker_id=worker_id, launcher="inline",
                             launched_at=f"{time.time():.3f}")
        for position, worker_id in enumerate(worker_ids):
            try:
                run_worker(self.network, worker_id, self.config, self.codec.secret, in_process=True,
                           reraise=True, batch=self._batch)
            except BaseException:
                for never_ran in worker_ids[position + 1:]:  # never left "launched" otherwise
                    set_worker_state(self, never_ran, WorkerState.FAILED, (WorkerState.LAUNCHED.value,),
                                     reason="not run: an earlier in-process worker raised",
                                     ended_at=f"{time.time():.3f}")
                raise
        return worker_ids

    def start_ssh_workers(self, worker_loop: Callable[..., Any], hosts: Sequence[Any],
                          n_workers: int = 1, globals: GlobalsArg = None, modules: Sequence[str] = (),
                          *, heartbeat_period: float | None = defaults.HEARTBEAT_PERIOD,
                          heartbeat_expire: float | None = defaults.HEARTBEAT_EXPIRE,
                          log_level: str = defaults.LOG_LEVEL, payload_dir: str | None = None,
                          redis_outage_timeout: float | None = None, walltime_margin: float | None = None,
                          **ssh_options: Any) -> list[str]:
        """Start workers on remote hosts over SSH (see ``rush_hpc.launchers.ssh.SSHLauncher``)."""
        from .launchers.ssh import SSHLauncher

        positive_count(n_workers)
        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, redis_outage_timeout=redis_outage_timeout,
                               walltime_margin=walltime_margin, _frame_depth=2)
        launcher = SSHLauncher(hosts, n_workers=positive_count(n_workers), network=self.network,
                               credentials=self._credentials_blob(), **ssh_options)
        self._supervisor.context.ssh.append(launcher)  # its hosts: the only ones we ever contact
        with self._start_in_flight():
            try:
                return self.start_workers(launcher, launcher.total_workers, launcher.command())
            finally:  # removed over SSH once their workers registered (and at close() at the latest)
                with self._credentials_lock:
                    self._credential_files.extend(launcher.credential_files)

    def start_slurm_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                            globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                            heartbeat_period: float | None = defaults.HEARTBEAT_PERIOD,
                            heartbeat_expire: float | None = defaults.SLURM_HEARTBEAT_EXPIRE,
                            log_level: str = defaults.LOG_LEVEL, payload_dir: str | None = None,
                            log_dir: str | None = None, redis_outage_timeout: float | None = None,
                            walltime_margin: float | None = None, **slurm_options: Any) -> list[str]:
        """Start workers as ONE SLURM job array through submitit.

        ``workers_per_job=k``: each array task runs k workers (forked by one interpreter: one import
        per job) and asks for k x ``cpus_per_worker`` CPUs; fewer, larger jobs for the scheduler.
        """
        from .launchers.slurm import SubmititLauncher

        positive_count(n_workers)
        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, redis_outage_timeout=redis_outage_timeout,
                               walltime_margin=walltime_margin, _frame_depth=2)
        return self._start_in_directory(lambda d: SubmititLauncher(d, **slurm_options), n_workers, log_dir)

    def start_sbatch_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                             globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                             heartbeat_period: float | None = defaults.HEARTBEAT_PERIOD,
                             heartbeat_expire: float | None = defaults.SLURM_HEARTBEAT_EXPIRE,
                             log_level: str = defaults.LOG_LEVEL, payload_dir: str | None = None,
                             log_dir: str | None = None, redis_outage_timeout: float | None = None,
                             walltime_margin: float | None = None, login: str | None = None,
                             **sbatch_options: Any) -> list[str]:
        """Start workers as ONE job array from a job script template (``rush_hpc/templates/sbatch.sh``,
        or your own file: ``template="/path/to/job.sh"``). ``workers_per_job=k``: k workers per
        array task, as for ``start_slurm_workers``.

        ``login="user@login-node"``: submit from this machine (a laptop) through a SLURM login node
        over SSH: the job script and the credentials file are written there (in ``log_dir``, a
        directory on the login node, default ``~/.rush-hpc/logs``), sbatch / squeue / sacct / scancel
        run there. The SSH connection takes the options of ``start_ssh_workers`` (``ssh_config``,
        ``connect_kwargs``, ``gateway``, ``connect_timeout``, ``host_key_policy``; the host key must be
        known). ``python`` is then the interpreter on the cluster (default ``python3``). The workers
        must reach Redis from the compute nodes (see the README: Redis on the login node, or a tunnel).
        """
        from .launchers.sbatch import SbatchLauncher

        count = positive_count(n_workers)
        login_node = self._login_node(login, sbatch_options) if login is not None else None
        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, redis_outage_timeout=redis_outage_timeout,
                               walltime_margin=walltime_margin, _frame_depth=2)
        if login_node is None:
            return self._start_in_directory(lambda d: SbatchLauncher(d, **sbatch_options), n_workers, log_dir)
        with self._start_in_flight():
            launcher = SbatchLauncher(log_dir or defaults.SSH_LOG_DIR, login=login_node, **sbatch_options)
            path = login_node.write_private_file(str(launcher.log_dir), "credentials-", self._credentials_blob())
            return self._start_with_credentials(launcher, count, LoginCredentials(login_node, path), path)

    def _login_node(self, target: str, options: dict[str, Any]) -> LoginNode:
        """The login node ``target`` (one per target and connection options, its connection shared
        by later starts and by the handles); pops the connection options from ``options``."""
        node = LoginNode(target, **{k: options.pop(k) for k in CONNECTION_OPTIONS if k in options})
        known = self._logins.setdefault(node.key(), node)
        if known is node:
            self._supervisor.context.logins.append(node)  # the only login nodes handles may use
        return known

    def sbatch_script(self, n_workers: int = 1, log_dir: str | None = None, **sbatch_options: Any) -> str:
        """The job script ``start_sbatch_workers`` would submit (dry run; no secrets in it)."""
        from .launchers.sbatch import SbatchLauncher

        for name in ("login", *CONNECTION_OPTIONS):  # where it would be submitted does not change it
            sbatch_options.pop(name, None)
        directory = Path(log_dir) if log_dir else Path("<log_dir>")
        launcher = SbatchLauncher(directory, **sbatch_options)
        command = WorkerCommand(self.network, launcher.python,
                                {CREDENTIALS_ENV: str(directory / "credentials.json")}, launcher.name)
        return launcher.render(positive_count(n_workers), command, batch_id="<batch>")

    def _credentials_blob(self) -> bytes:
        return credentials_blob(self.worker_config, self.codec.secret)

    def worker_script(self, worker_loop: Callable[..., Any] | None = None, globals: GlobalsArg = None,
                      modules: Sequence[str] = (), *, python: str = "python3",
                      credentials_file: str | None = None, show_secrets: bool = False,
                      **loop_options: Any) -> str:
        """The shell line that starts one worker anywhere (any scheduler, any host).

        With ``worker_loop`` the loop is stored first. With ``credentials_file`` the secrets are
        written there (mode 0600) and the line only names the file; otherwise the line carries
        ``RUSH_HPC_URL`` and ``RUSH_HPC_SECRET``, shown as ``***`` unless ``show_secrets=True``.
        """
        if worker_loop is not None:
            self.store_worker_loop(worker_loop, globals, modules, _frame_depth=2, **loop_options)
        if credentials_file is not None:
            write_credentials(credentials_file, self.worker_config, self.codec.secret)
            env = {CREDENTIALS_ENV: str(credentials_file)}
        else:
            secret = self.codec.secret.decode() if self.codec.secret and show_secrets else "***"
            env = {"RUSH_HPC_URL": self.worker_config.to_url(show_secrets=show_secrets), "RUSH_HPC_SECRET": secret}
        if worker_loop is not None and self._batch:
            env[BATCH_ENV] = self._batch  # this line's workers run this loop, whatever is stored later
        return WorkerCommand(self.network, python, env).shell(None)

    # -- answering questions ----------------------------------------------------------------
    def _worker_hashes(self, worker_ids: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
        return self._supervisor.worker_hashes(worker_ids)

    def _ids_in_state(self, *states: str) -> list[str]:
        """Kept for old callers; use ``worker_ids(state=...)``."""
        return self._supervisor.worker_ids(*states)

    @property
    def worker_ids(self) -> WorkerIds:
        """Every worker id (a sorted list); ``rush.worker_ids(state="running")`` filters by state."""
        return WorkerIds(self._supervisor.worker_ids(), self._supervisor)

    def worker_ids_in(self, *states: WorkerState | str) -> list[str]:
        """Ids of the workers in any of ``states`` (``WorkerState`` members or their names), sorted."""
        return self._supervisor.worker_ids(*states) if states else []

    @property
    def running_worker_ids(self) -> list[str]:
        """Ids of the workers that are running (registered, not ended, not found lost)."""
        return self._supervisor.worker_ids(WorkerState.RUNNING)

    @property
    def worker_info(self) -> pd.DataFrame:
        """One row per worker: worker_id, state, pid, hostname, launcher, host, job_id, login (SLURM
        login node), node, heartbeat, ..."""
        import pandas as pd

        hashes = self._worker_hashes()
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in hashes:
            pipe.get(self.keys.heartbeat(worker_id))
        beats = pipe.execute()
        columns = ["worker_id", "state", "pid", "hostname", "launcher", "host", "job_id", "login", "node",
                   "python", "launched_at", "started_at", "ended_at", "heartbeat", "reason", "job_state"]
        rows = []
        for (worker_id, info), beat in zip(hashes.items(), beats):
            row: dict[str, Any] = {c: info.get(c) for c in columns}
            row["worker_id"] = worker_id
            row["heartbeat"] = _float_or_none(beat)
            rows.append(row)
        frame = pd.DataFrame.from_records(rows, columns=columns)
        for column in ("launched_at", "started_at", "ended_at", "heartbeat"):
            frame[column] = pd.to_datetime(pd.to_numeric(frame[column], errors="coerce"), unit="s")
        return frame

    # -- supervising (see supervisor.py) ----------------------------------------------------
    def wait_for_workers(self, n: int | None = None, worker_ids: Sequence[str] | None = None,
                         timeout: float | None = defaults.WAIT_TIMEOUT, poll: float = defaults.WAIT_POLL,
                         progress: bool | None = None) -> None:
        """Block until ``n`` workers (or all of ``worker_ids``) have registered.

        Raises ``WorkerStartError`` as soon as a worker fails or exits before registering (with the
        tail of its output when this controller started it) or a SLURM job pends for a reason that
        will not clear (with the job id and the fix), and ``RushTimeoutError`` (listing who is
        missing) after ``timeout``. ``progress``: a progress bar on stderr; None (default) shows it
        on a terminal only.
        """
        from . import progress as progress_display

        total = len(worker_ids) if worker_ids is not None else n
        with progress_display.tracker(total=total, description="workers", unit="registered",
                                      progress=progress) as bar:
            self._supervisor.wait_for_workers(n, worker_ids, timeout, poll, on_poll=bar.update)
        self._remove_spent_credentials()

    def detect_lost_workers(self) -> list[str]:
        """Mark workers lost whose heartbeat expired or whose process / job ended; returns their ids.

        Their running tasks go back to the queue (retries left) or fail with the reason; the SLURM
        jobs of lost workers are cancelled (requeued ones too).
        """
        lost = self._supervisor.detect_lost_workers()
        self._remove_spent_credentials()
        return lost

    def _watch_workers(self) -> bool:
        """Hook of the waits (``wait_for_tasks``): detect lost workers; True when tasks were released."""
        return bool(self.detect_lost_workers()) or self._supervisor.released_by_sweep > 0

    def start_monitor(self, interval: float = defaults.MONITOR_INTERVAL) -> None:
        """Run ``detect_lost_workers()`` every ``interval`` seconds in a background thread."""
        self._supervisor.start_monitor(interval, self.detect_lost_workers)

    def stop_monitor(self) -> None:
        """Stop the background lost-worker checks of ``start_monitor``."""
        self._supervisor.stop_monitor()

    @property
    def _monitor_stop(self) -> threading.Event:  # kept for callers of the old attribute
        return self._supervisor._monitor_stop

    @property
    def _launchers(self) -> dict[str, Any]:
        """Gone: launchers return handles now (``self._supervisor.handles``); empty for old callers."""
        return {}

    def stop_workers(self, type: str = "terminate", worker_ids: Sequence[str] | None = None,
                     kill_grace: float = defaults.KILL_GRACE) -> None:
        """``terminate``: ask workers to finish (``rush.terminated`` becomes True in their loop).
        ``kill``: stop them now; their running tasks fail (or requeue when retries are left).
        """
        if type not in ("terminate", "kill"):
            raise ConfigError(f"type must be 'terminate' or 'kill', got {type!r}")
        if worker_ids is None:
            self._stop_adapt()  # stopping every worker also stops the policy that would replace them
        if not self.redis.exists(self.keys.workers):
            raise ConfigError(f"network {self.network!r} has no workers in Redis at {self.config} "
                              "(a typo in the network name, or was it reset?)")
        if worker_ids is not None:
            worker_ids = list(worker_ids)
            known = self.redis.smismember(self.keys.workers, worker_ids) if worker_ids else []
            unknown = [w for w, k in zip(worker_ids, known) if not k]
            if unknown:
                raise ConfigError(f"unknown worker id(s) in network {self.network!r}: {unknown[:5]}; "
                                  "see rush.worker_info (or `rush-hpc workers`)")
        ids = worker_ids if worker_ids is not None else self._supervisor.worker_ids(*ACTIVE)
        if type == "terminate":  # to each worker alive now: workers started later are not affected
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.rpush(self.keys.control(worker_id), "terminate")
            pipe.execute()
            return
        self._kill(ids, kill_grace)

    def _kill(self, ids: Sequence[str], grace: float) -> None:
        self._supervisor.kill(ids, grace)

    # -- elastic workers ---------------------------------------------------------------------
    def adapt(self, minimum: int | None = 0, maximum: int = 1, launcher: str = "local", *,
              worker_loop: Callable[..., Any] | None = None, interval: float = 2.0, idle_timeout: float = 60.0,
              lifetime_stagger: float | None = None, max_start_failures: int = 3,
              **launcher_options: Any) -> None:
        """Keep between ``minimum`` and ``maximum`` workers alive by themselves (a policy thread).

        Starts workers (``start_<launcher>_workers(worker_loop, **launcher_options)``) while tasks wait
        and fewer than ``maximum`` are alive (starting ones count), replaces lost and failed ones,
        starts the replacement of a worker whose allocation ends within ``lifetime_stagger`` seconds
        (default: 120 s for SLURM launchers, 0 otherwise), and asks workers idle for ``idle_timeout``
        seconds to terminate, down to ``minimum``. After ``max_start_failures`` failed starts in a row it
        stops with an error (``adapt_status()``). ``adapt(None)`` or ``stop_workers()`` stops it.
        See ``rush_hpc.adapt``.
        """
        from .adapt import AdaptPolicy

        self._stop_adapt()
        if minimum is None:
            return
        if worker_loop is None:
            raise ConfigError("adapt needs worker_loop=... (the loop the workers it starts run)")
        if lifetime_stagger is None:
            lifetime_stagger = 120.0 if launcher in ("slurm", "sbatch") else 0.0
        if "globals" in launcher_options:  # names are looked up here, not in the policy's thread
            launcher_options["globals"] = resolve_globals(launcher_options["globals"], 2)
        policy = AdaptPolicy(self, int(minimum), int(maximum), launcher, worker_loop, interval, idle_timeout,
                             lifetime_stagger, max_start_failures, dict(launcher_options))
        self._adapt = policy
        policy.start()

    def adapt_status(self) -> dict[str, str]:
        """The elastic-workers policy as recorded in Redis (also by another controller); {} if none."""
        return {text(k): text(v) for k, v in self.redis.hgetall(self.keys.adapt).items()}

    def _stop_adapt(self) -> None:
        policy, self._adapt = self._adapt, None
        if policy is not None:
            policy.stop()

    # -- logs -------------------------------------------------------------------------------

    # -- logs -------------------------------------------------------------------------------
    def read_log(self, worker_ids: Sequence[str] | None = None, n: int | None = None) -> pd.DataFrame:
        """Log records the workers wrote to Redis (time, worker_id, level, logger, message)."""
        return read_log(self.redis, self.keys.log, worker_ids, n)

    def print_log(self, worker_ids: Sequence[str] | None = None, n: int | None = None) -> None:
        """Print the workers' log records (local time, short worker id, level, message); ``worker_ids``
        and ``n`` (the last n records) as for ``read_log``."""
        for record in self.read_log(worker_ids, n).itertuples():
            when = format_local(record.time.timestamp(), with_date=False, with_offset=False)
            print(f"{when} {record.worker_id[:8]} {record.level:<7} {record.message}")

    # -- housekeeping -----------------------------------------------------------------------
    def reset(self, type: str = "kill") -> None:
        """Stop the workers and delete every key of this network (other networks are untouched)."""
        if self._supervisor.worker_ids(*ACTIVE):
            self.stop_workers(type=type)
        deleted = 0
        batch: list[bytes] = []
        for key in self._network_key_names():
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self.redis.unlink(*batch)
                batch = []
        if batch:
            deleted += self.redis.unlink(*batch)
        self._clear_task_cache()
        self._supervisor.reap(timeout=5.0)
        if type == "kill":  # every worker we started is gone (killed, reaped, its job cancelled)
            self._remove_log_dir(set())
        self._supervisor.forget()
        logger.info("reset network %s (%d keys deleted)", self.network, deleted)

    def _network_key_names(self) -> Iterator[Any]:
        """Every key of the network: ``SCAN MATCH``, or - for an ACL user denied SCAN (see the README's
        ACL line: SCAN would list other networks' key names) - the keys the network's indexes name."""
        try:
            yield from self.redis.scan_iter(match=self.keys.pattern, count=1000)
            return
        except redis.exceptions.NoPermissionError:
            pass
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(k.all_tasks, 0, -1)
        pipe.smembers(k.workers)
        pipe.smembers(k.priority_workers)
        pipe.smembers(k.payload_batches)
        task_ids, worker_ids, priority_ids, batches = pipe.execute()
        yield from (k.task(text(t)) for t in task_ids)
        for batch in batches:
            yield from (k.batch_payload(text(batch)), k.batch_payload_meta(text(batch)))
        for worker_id in {text(w) for w in worker_ids} | {text(w) for w in priority_ids}:
            yield from k.worker_keys(worker_id)
        yield from k.fixed_keys()

    def _remove_log_dir(self, active: set[str]) -> None:
        """Remove our private temporary directory (credentials, logs, job scripts) unless a worker
        started with it is still ``active`` (it may still need its credentials file)."""
        if self._log_dir is None or self._log_dir_users & active:
            return
        shutil.rmtree(self._log_dir, ignore_errors=True)
        self._log_dir, self._log_dir_users = None, set()

    def __str__(self) -> str:
        c = self.counts()
        return "\n".join([
            "<Rush>",
            f"* Running Workers: {c['running_workers']}",
            f"* Queued Tasks: {c['queued']}",
            f"* Queued Priority Tasks: {c['queued_priority']}",
            f"* Running Tasks: {c['running']}",
            f"* Finished Tasks: {c['finished']}",
            f"* Failed Tasks: {c['failed']}",
        ])

    def __repr__(self) -> str:
        return f"<Rush network={self.network!r} redis={self.config}>"

    def close(self) -> None:
        """Stop the monitor, reap local workers, and stop the embedded Redis (if any).

        With an embedded Redis the network ends here, so its local workers are killed first
        rather than left to crash on a vanished server. The private temporary directory goes
        once no worker of this controller still runs.
        """
        if self._closed:
            return
        self._supervisor.stop_monitor()
        self._stop_adapt()
        with self._flight:  # starts under way (adapt's) finish, so their credentials are removed below
            if not self._flight.wait_for(lambda: self._in_flight == 0, timeout=defaults.COMMAND_TIMEOUT + 10):
                logger.warning("close(): %d start(s) still under way; their credentials files may remain",
                               self._in_flight)
        active: set[str] = set()
        if self._supervisor.handles:
            try:
                active = set(self._supervisor.worker_ids(*ACTIVE))
            except redis.RedisError:  # cannot tell: keep what workers may still need
                active = set(self._supervisor.handles)
        if self._embedded is not None:
            local = [w for w in active if getattr(self._supervisor.handles.get(w), "launcher", None) == "local"]
            if local:
                self._kill(local, grace=1.0)
                active -= set(local)
        self._supervisor.reap(timeout=0.0)
        self._remove_spent_credentials(everything=True)
        self._remove_log_dir(active)
        for login in self._logins.values():
            login.close()
        self._closed = True
        super().close()
        if self._embedded is not None:
            self._embedded.stop()

    def __enter__(self) -> Rush:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value else None
    except (TypeError, ValueError):
        return None


def with_address(config: RedisConfig, address: str | None) -> RedisConfig:
    """``config`` with another ``host:port`` (same credentials, TLS and timeouts)."""
    if address is None:
        return config
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
            c.isspace() or c in "/@" for c in host):
        raise ConfigError(f"worker_address must be 'host:port' (where the workers reach Redis), got {address!r}")
    if config.cluster:
        raise ConfigError("worker_address does not work with a Redis Cluster (its nodes announce their own "
                          "addresses to every client)")
    return dataclasses.replace(config, host=host.strip("[]"), port=int(port))


def rsh(network: str | None = None, url: str | None = None, *, config: RedisConfig | None = None,
        secret: str | bytes | None = None, redis_outage_timeout: float | None = None,
        worker_address: str | None = None) -> Rush:
    """Connect to (or create) network ``network`` and return its controller (``with rsh(...) as rush:``
    closes it).

    ``network``: the name workers and controllers share (default: a new random one).
    Redis: ``config`` (a ``RedisConfig``), else ``url`` (``redis://[user:password@]host:port/db``,
    ``rediss://`` for TLS, ``redis+cluster://`` for a Redis Cluster), else ``RUSH_HPC_URL`` /
    ``REDIS_URL``, else an embedded redis-server started for this controller on 127.0.0.1 with a
    generated password (stopped by ``close()``).
    ``secret``: the key that signs pickled values (default: ``RUSH_HPC_SECRET``, ``RUSH_HPC_SECRET_FILE``
    or ``~/.config/rush-hpc/secret``, created when missing).

    ``redis_outage_timeout``: how long the controller and its workers retry through a Redis outage
    (a restart, a network blip) before giving up; default 60 s (5 s with the embedded Redis, which
    is only gone when this controller is).
    ``worker_address``: ``"host:port"`` where the workers reach this Redis when it is not where the
    controller does (the controller on a laptop through an SSH tunnel, ``url="...@localhost:6380"``;
    the workers at ``"login1:6380"``). Only the address differs: password, TLS and timeouts are the same.
    """
    resolved = resolve_config(url, config)
    embedded = None
    if resolved is None:
        embedded = EmbeddedRedis()
        resolved = dataclasses.replace(embedded.config, outage_timeout=EMBEDDED_OUTAGE_TIMEOUT)
    if redis_outage_timeout is not None:
        if not redis_outage_timeout >= 0:
            raise ConfigError(f"redis_outage_timeout must be >= 0 seconds, got {redis_outage_timeout!r}")
        resolved = dataclasses.replace(resolved, outage_timeout=float(redis_outage_timeout))
    try:
        return Rush(network or uuid.uuid4().hex, resolved, resolve_secret(secret), embedded, worker_address)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
