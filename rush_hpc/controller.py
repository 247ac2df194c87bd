"""``Rush``, the controller: starts workers, watches them, stops them, reads their logs.

The launchers only start processes; this module owns the life of a worker as seen in Redis:
launched -> running -> terminated | failed | killed | lost.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import redis

from . import heartbeat as heartbeat_settings
from .config import RedisConfig, resolve_config
from .credentials import (CREDENTIALS_ENV, CredentialsFile, create_credentials_file, credentials_blob,
                          resolve_secret, write_credentials)
from .exceptions import ConfigError, LaunchError, RushTimeoutError, WorkerStartError
from .launchers.base import Launcher, WorkerCommand
from .launchers.local import LocalLauncher
from .logs import read_log
from .network import RushNetwork, text
from .payload import GlobalsArg, resolve_globals, store_payload
from .server import EmbeddedRedis
from .worker import set_worker_state

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: workers of an embedded Redis give up quickly: it is only gone when its controller is
EMBEDDED_OUTAGE_TIMEOUT = 5.0



class Rush(RushNetwork):
    """The controller of a network. Create it with ``rush_hpc.rsh()``."""

    def __init__(self, network: str, config: RedisConfig, secret: bytes | None,
                 embedded: EmbeddedRedis | None = None) -> None:
        super().__init__(network, config, secret)
        self._embedded = embedded
        self._launchers: dict[str, Launcher] = {}
        self._log_dir: Path | None = None
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._released_by_sweep = 0
        self._adapt: Any = None
        self._credential_files: list[tuple[CredentialsFile, list[str]]] = []
        self._credentials_lock = threading.Lock()  # the monitor thread removes them too

    # -- starting workers -------------------------------------------------------------------
    def _worker_log_dir(self, log_dir: str | Path | None) -> Path:
        if log_dir is not None:
            path = Path(log_dir).expanduser()
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            return path
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"rush-hpc-{self.network}-"))
        return self._log_dir

    def store_worker_loop(self, worker_loop: Callable[..., Any], globals: GlobalsArg = None,
                          modules: Sequence[str] = (), *, heartbeat_period: float | None = 1.0,
                          heartbeat_expire: float | None = 5.0, log_level: str = "INFO",
                          payload_dir: str | None = None, _frame_depth: int = 2) -> None:
        """Serialize, sign and store the worker loop that every worker of this network runs."""
        heartbeat_settings.validate(heartbeat_period, heartbeat_expire)
        store_payload(self, worker_loop, resolve_globals(globals, _frame_depth + 1), modules,
                      {"heartbeat_period": heartbeat_period, "heartbeat_expire": heartbeat_expire,
                       "log_level": log_level}, spill_dir=payload_dir)

    def _start_in_directory(self, make_launcher: Callable[[Path], Any], n_workers: int,
                            log_dir: str | None) -> list[str]:
        """Launchers whose workers see this machine's files (local, SLURM with a shared ``log_dir``):
        output and the 0600 credentials file go to ``log_dir``."""
        directory = self._worker_log_dir(log_dir)
        launcher = make_launcher(directory)
        credentials = create_credentials_file(directory, self.config, self.codec.secret)
        command = WorkerCommand(self.network, launcher.python, {CREDENTIALS_ENV: str(credentials.path)})
        try:
            ids = self.start_workers(launcher, n_workers, command)
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
            launched = set(self._ids_in_state("launched")) if self._credential_files and not everything else set()
            for credentials, ids in self._credential_files:
                if everything or not launched.intersection(ids):
                    credentials.remove()
                else:
                    keep.append((credentials, ids))
            self._credential_files = keep

    def start_workers(self, launcher: Launcher, n_workers: int, command: WorkerCommand,
                      pre_info: Mapping[str, str] | None = None) -> list[str]:
        """Register ``n_workers`` ids as launched, start them, record what the launcher reports."""
        if not isinstance(n_workers, int) or n_workers < 1:
            raise ConfigError(f"n_workers must be a positive integer, got {n_workers!r}")
        worker_ids = [uuid.uuid4().hex for _ in range(n_workers)]
        now = f"{time.time():.3f}"
        for worker_id in worker_ids:
            set_worker_state(self, worker_id, "launched", "", worker_id=worker_id,
                             launcher=launcher.name, launched_at=now, **(pre_info or {}))
        try:
            infos = launcher.start(worker_ids, command)
        except LaunchError as error:
            self._record_infos(launcher, error.infos)
            for worker_id in set(worker_ids) - set(error.infos):
                set_worker_state(self, worker_id, "failed", ("launched",), reason=f"launch failed: {error}")
            raise
        except BaseException as error:
            for worker_id in worker_ids:
                set_worker_state(self, worker_id, "failed", ("launched",), reason=f"launch failed: {error}")
            raise
        self._record_infos(launcher, infos)
        logger.info("started %d %s worker(s) in network %s", len(infos), launcher.name, self.network)
        return worker_ids

    def _record_infos(self, launcher: Launcher, infos: Mapping[str, Mapping[str, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for worker_id, info in infos.items():
            self._launchers[worker_id] = launcher
            pipe.hset(self.keys.worker(worker_id), mapping={k: v for k, v in info.items() if v is not None})
        pipe.execute()

    def start_local_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                            globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                            heartbeat_period: float | None = 1.0, heartbeat_expire: float | None = 5.0,
                            log_level: str = "INFO", log_dir: str | None = None,
                            payload_dir: str | None = None, python: str | None = None) -> list[str]:
        """Start ``n_workers`` worker processes on this machine; returns their ids.

        Their stdout/stderr go to ``log_dir`` (a private temporary directory by default).
        """
        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, _frame_depth=2)
        return self._start_in_directory(lambda d: LocalLauncher(d, python), n_workers, log_dir)

    def start_ssh_workers(self, worker_loop: Callable[..., Any], hosts: Sequence[Any],
                          n_workers: int = 1, globals: GlobalsArg = None, modules: Sequence[str] = (),
                          *, heartbeat_period: float | None = 1.0, heartbeat_expire: float | None = 5.0,
                          log_level: str = "INFO", payload_dir: str | None = None,
                          **ssh_options: Any) -> list[str]:
        """Start workers on remote hosts over SSH (see ``rush_hpc.launchers.ssh.SSHLauncher``)."""
        from .launchers.ssh import SSHLauncher

        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, _frame_depth=2)
        launcher = SSHLauncher(hosts, n_workers=n_workers, network=self.network,
                               credentials=self._credentials_blob(), **ssh_options)
        return self.start_workers(launcher, launcher.total_workers, launcher.command())

    def start_slurm_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                            globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                            heartbeat_period: float | None = 1.0, heartbeat_expire: float | None = 10.0,
                            log_level: str = "INFO", payload_dir: str | None = None,
                            log_dir: str | None = None, **slurm_options: Any) -> list[str]:
        """Start workers as ONE SLURM job array through submitit."""
        from .launchers.slurm import SubmititLauncher

        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, _frame_depth=2)
        return self._start_in_directory(lambda d: SubmititLauncher(d, **slurm_options), n_workers, log_dir)

    def start_sbatch_workers(self, worker_loop: Callable[..., Any], n_workers: int = 1,
                             globals: GlobalsArg = None, modules: Sequence[str] = (), *,
                             heartbeat_period: float | None = 1.0, heartbeat_expire: float | None = 10.0,
                             log_level: str = "INFO", payload_dir: str | None = None,
                             log_dir: str | None = None, **sbatch_options: Any) -> list[str]:
        """Start workers as ONE job array from a job script template (``templates/sbatch.sh``)."""
        from .launchers.sbatch import SbatchLauncher

        self.store_worker_loop(worker_loop, globals, modules, heartbeat_period=heartbeat_period,
                               heartbeat_expire=heartbeat_expire, log_level=log_level,
                               payload_dir=payload_dir, _frame_depth=2)
        return self._start_in_directory(lambda d: SbatchLauncher(d, **sbatch_options), n_workers, log_dir)

    def sbatch_script(self, n_workers: int = 1, log_dir: str | None = None, **sbatch_options: Any) -> str:
        """The job script ``start_sbatch_workers`` would submit (dry run; no secrets in it)."""
        from .launchers.sbatch import SbatchLauncher

        directory = Path(log_dir) if log_dir else Path("<log_dir>")
        launcher = SbatchLauncher(directory, **sbatch_options)
        command = WorkerCommand(self.network, launcher.python,
                                {CREDENTIALS_ENV: str(directory / "credentials.json")})
        return launcher.render(n_workers, command, batch_id="<batch>")

    def _credentials_blob(self) -> bytes:
        return credentials_blob(self.config, self.codec.secret)

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
            write_credentials(credentials_file, self.config, self.codec.secret)
            env = {CREDENTIALS_ENV: str(credentials_file)}
        else:
            secret = self.codec.secret.decode() if self.codec.secret and show_secrets else "***"
            env = {"RUSH_HPC_URL": self.config.to_url(show_secrets=show_secrets), "RUSH_HPC_SECRET": secret}
        return WorkerCommand(self.network, python, env).shell(None)

    # -- observing workers ------------------------------------------------------------------
    def _worker_hashes(self, worker_ids: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
        ids = sorted(text(w) for w in self.redis.smembers(self.keys.workers)) \
            if worker_ids is None else list(worker_ids)
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
        return {wid: {k.decode(): v.decode() for k, v in h.items()} for wid, h in zip(ids, pipe.execute())}

    def _ids_in_state(self, *states: str) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for state in states:
            pipe.smembers(self.keys.worker_state_set(state))
        return sorted({w.decode() for members in pipe.execute() for w in members})

    @property
    def worker_ids(self) -> list[str]:
        return sorted(text(w) for w in self.redis.smembers(self.keys.workers))

    @property
    def running_worker_ids(self) -> list[str]:
        return self._ids_in_state("running")

    @property
    def worker_info(self) -> pd.DataFrame:
        """One row per worker: worker_id, state, pid, hostname, launcher, host, job_id, heartbeat, ..."""
        import pandas as pd

        hashes = self._worker_hashes()
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in hashes:
            pipe.get(self.keys.heartbeat(worker_id))
        beats = pipe.execute()
        columns = ["worker_id", "state", "pid", "hostname", "launcher", "host", "job_id", "node",
                   "python", "launched_at", "started_at", "ended_at", "heartbeat", "reason"]
        rows = []
        for (worker_id, info), beat in zip(hashes.items(), beats):
            row: dict[str, Any] = {c: info.get(c) for c in columns}
            row["worker_id"] = worker_id
            row["heartbeat"] = float(beat) if beat else None
            rows.append(row)
        frame = pd.DataFrame.from_records(rows, columns=columns)
        for column in ("launched_at", "started_at", "ended_at", "heartbeat"):
            frame[column] = pd.to_datetime(pd.to_numeric(frame[column]), unit="s")
        return frame

    def _start_failure(self, worker_id: str, info: Mapping[str, str], reason: str) -> str:
        launcher = self._launchers.get(worker_id)
        output = launcher.output_tail(info) if launcher else ""
        return f"{reason}" + (f"\n--- end of its output ---\n{output}" if output else "")

    def wait_for_workers(self, n: int | None = None, worker_ids: Sequence[str] | None = None,
                         timeout: float | None = 60.0, poll: float = 0.02) -> None:
        """Block until ``n`` workers (or all of ``worker_ids``) have registered.

        Raises ``WorkerStartError`` as soon as a worker fails or exits before registering (with the
        tail of its stderr), and ``RushTimeoutError`` (listing who is missing) after ``timeout``.
        """
        if n is None and worker_ids is None:
            raise ConfigError("wait_for_workers needs n= or worker_ids=")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hashes = self._worker_hashes(worker_ids)
            registered = [w for w, h in hashes.items() if h.get("started_at")]
            waiting = {w: h for w, h in hashes.items() if not h.get("started_at")}
            failures = self._start_failures(waiting)
            target = len(worker_ids) if worker_ids is not None else n
            if failures:
                details = "\n".join(f"worker {w}: {r}" for w, r in failures.items())
                raise WorkerStartError(f"{len(failures)} worker(s) failed before registering:\n{details}",
                                       failures)
            if len(registered) >= (target or 0):
                self._remove_spent_credentials()
                return
            if deadline is not None and time.monotonic() > deadline:
                details = "\n".join(f"worker {w} ({h.get('launcher')}, {h.get('state')}): "
                                    f"{self._start_failure(w, h, 'not registered')}"
                                    for w, h in list(waiting.items())[:10])
                raise RushTimeoutError(f"only {len(registered)} of {target} workers registered within "
                                       f"{timeout} s.\n{details}")
            time.sleep(poll)

    def _start_failures(self, waiting: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        failures = {w: self._start_failure(w, h, h.get("reason", "failed"))
                    for w, h in waiting.items() if h.get("state") == "failed"}
        launched = {w: h for w, h in waiting.items() if h.get("state") == "launched"}
        for worker_id, reason in self._gone(launched).items():
            # it may have registered in the meantime
            if self.redis.hget(self.keys.worker(worker_id), "started_at") is None:
                failure = self._start_failure(worker_id, launched[worker_id], reason + " before registering")
                set_worker_state(self, worker_id, "failed", ("launched",), reason=failure,
                                 ended_at=f"{time.time():.3f}")
                failures[worker_id] = failure
        return failures

    def _gone(self, infos: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Ask each worker's launcher which processes / jobs have ended."""
        by_launcher: dict[int, tuple[Launcher, dict[str, Mapping[str, str]]]] = {}
        for worker_id, info in infos.items():
            launcher = self._launchers.get(worker_id) or _launcher_from_info(info)
            if launcher is not None:
                by_launcher.setdefault(id(launcher), (launcher, {}))[1][worker_id] = info
        reasons: dict[str, str] = {}
        for launcher, group in by_launcher.values():
            reasons.update(launcher.gone(group))
        return reasons

    def detect_lost_workers(self) -> list[str]:
        """Mark workers lost whose heartbeat expired or whose process / job ended; returns their ids.

        Their running tasks go back to the queue (retries left) or fail with the reason.
        """
        hashes = self._worker_hashes(self._ids_in_state("running"))
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in hashes:
            pipe.exists(self.keys.heartbeat(worker_id))
        beating = dict(zip(hashes, pipe.execute()))
        reasons = self._gone(hashes)
        grace = self._in_outage_grace(hashes)
        for worker_id, info in hashes.items():
            if grace:
                break  # Redis was down for everyone: give the workers time to beat again
            if worker_id not in reasons and info.get("heartbeat_expire") and not beating[worker_id]:
                reasons[worker_id] = f"heartbeat expired (no beat for {info['heartbeat_expire']} s)"
        lost = []
        for worker_id, reason in reasons.items():
            ended = self.end_worker(worker_id, "lost", ("running",), f"worker {worker_id} lost: {reason}",
                                    reason=reason, ended_at=f"{time.time():.3f}")
            if ended is not None:
                logger.warning("worker %s lost (%s); %d task(s) failed, %d requeued", worker_id, reason,
                               len(ended[1]), len(ended[2]))
                lost.append(worker_id)
        self._start_failures(self._worker_hashes(self._ids_in_state("launched")))
        failed, requeued = self.sweep_orphaned_tasks()
        self._released_by_sweep = len(failed) + len(requeued)
        self._remove_spent_credentials()
        return lost

    def _in_outage_grace(self, hashes: Mapping[str, Mapping[str, str]]) -> bool:
        """True shortly after a Redis outage (this client saw commands fail, or Redis restarted):
        heartbeats that expired while Redis was down say nothing about the workers."""
        window = max((_seconds(h.get("heartbeat_expire")) + _seconds(h.get("heartbeat_period"))
                      for h in hashes.values() if h.get("heartbeat_expire")), default=0.0)
        if not window:
            return False
        if self._retry.seen_outage_within(window):
            return True
        try:
            uptime = int(self.redis.info("server").get("uptime_in_seconds", window + 1))
        except redis.ResponseError:  # INFO may be denied to an ACL user
            return False
        return uptime < window

    def _watch_workers(self) -> bool:
        return bool(self.detect_lost_workers()) or self._released_by_sweep > 0

    def start_monitor(self, interval: float = 5.0) -> None:
        """Run ``detect_lost_workers()`` every ``interval`` seconds in a background thread."""
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor_stop.clear()

        def watch() -> None:
            warned_at = -float("inf")
            while not self._monitor_stop.wait(interval):
                try:
                    self.detect_lost_workers()
                except redis.RedisError as error:  # an outage longer than outage_timeout: say it once a minute
                    if time.monotonic() - warned_at > 60:
                        logger.warning("lost-worker monitor: Redis unavailable (%s); still watching", error)
                        warned_at = time.monotonic()
                except Exception:  # noqa: BLE001 - keep watching
                    logger.exception("lost-worker monitor failed")

        self._monitor = threading.Thread(target=watch, name=f"rush-monitor-{self.network}", daemon=True)
        self._monitor.start()

    # -- stopping workers -------------------------------------------------------------------
    def stop_workers(self, type: str = "terminate", worker_ids: Sequence[str] | None = None,
                     kill_grace: float = 3.0) -> None:
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
        ids = worker_ids if worker_ids is not None else self._ids_in_state("running", "launched")
        if type == "terminate":  # to each worker alive now: workers started later are not affected
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.rpush(self.keys.control(worker_id), "terminate")
            pipe.execute()
            return
        self._kill(ids, kill_grace)

    def _kill(self, ids: Sequence[str], grace: float) -> None:
        for worker_id in ids:
            self.end_worker(worker_id, "killed", ("launched", "running"), f"worker {worker_id} killed by the controller",
                            reason="killed by the controller", ended_at=f"{time.time():.3f}")
        # every requested worker that is killed or lost now gets the kill, whatever end_worker answered:
        # one declared lost earlier (frozen, cut off) may still run, and a re-sent end_worker is refused
        hashes = self._worker_hashes(ids)
        killed = [w for w in ids if hashes[w].get("state") in ("killed", "lost")]
        if killed:
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in killed:
                pipe.rpush(self.keys.control(worker_id), "kill")
            pipe.execute()
        deadline = time.monotonic() + grace
        pending = set(killed)
        while pending and time.monotonic() < deadline:
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in pending:
                pipe.exists(self.keys.heartbeat(worker_id))
            gone = self._gone({w: hashes[w] for w in pending})
            pending = {w for w, beat in zip(list(pending), pipe.execute()) if beat and w not in gone}
            if pending:
                time.sleep(0.05)
        force: dict[int, tuple[Launcher, dict[str, Mapping[str, str]]]] = {}
        for worker_id in killed:
            launcher = self._launchers.get(worker_id) or _launcher_from_info(hashes[worker_id])
            if launcher is not None and (worker_id in pending or launcher.always_force_kill
                                         or isinstance(launcher, LocalLauncher)):
                force.setdefault(id(launcher), (launcher, {}))[1][worker_id] = hashes[worker_id]
        for launcher, group in force.values():
            launcher.kill(group)
        logger.info("killed %d worker(s) of network %s", len(killed), self.network)

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
    def read_log(self, worker_ids: Sequence[str] | None = None, n: int | None = None) -> pd.DataFrame:
        """Log records the workers wrote to Redis (time, worker_id, level, logger, message)."""
        return read_log(self.redis, self.keys.log, worker_ids, n)

    def print_log(self, worker_ids: Sequence[str] | None = None, n: int | None = None) -> None:
        for record in self.read_log(worker_ids, n).itertuples():
            print(f"{record.time:%H:%M:%S} {record.worker_id[:8]} {record.level:<7} {record.message}")

    # -- housekeeping -----------------------------------------------------------------------
    def reset(self, type: str = "kill") -> None:
        """Stop the workers and delete every key of this network (other networks are untouched)."""
        if self._ids_in_state("running", "launched"):
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
        self._reap_local_workers(timeout=5.0)
        self._launchers.clear()
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
        task_ids, worker_ids, priority_ids = pipe.execute()
        yield from (k.task(text(t)) for t in task_ids)
        for worker_id in {text(w) for w in worker_ids} | {text(w) for w in priority_ids}:
            yield from k.worker_keys(worker_id)
        yield from k.fixed_keys()

    def _reap_local_workers(self, timeout: float) -> None:
        for launcher in {id(l): l for l in self._launchers.values()}.values():
            if isinstance(launcher, LocalLauncher):
                launcher.reap(timeout)

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
        rather than left to crash on a vanished server.
        """
        self._monitor_stop.set()
        self._stop_adapt()
        if self._embedded is not None:
            local = [w for w in self._ids_in_state("running", "launched")
                     if isinstance(self._launchers.get(w), LocalLauncher)]
            if local:
                self._kill(local, grace=1.0)
        self._reap_local_workers(timeout=0.0)
        self._remove_spent_credentials(everything=True)
        super().close()
        if self._embedded is not None:
            self._embedded.stop()

    def __enter__(self) -> Rush:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _launcher_from_info(info: Mapping[str, str]) -> Launcher | None:
    """A launcher able to check a worker that another controller process started."""
    kind = info.get("launcher")
    if kind == "local":
        return LocalLauncher(Path(info.get("stderr", ".")).parent)
    if kind in ("slurm", "sbatch") and info.get("job_id"):
        from .launchers.slurm import SlurmJobs

        return SlurmJobs()
    return None


def _seconds(value: str | None, limit: float = 3600.0) -> float:
    """A duration read from a worker hash (untrusted): a number of seconds in [0, limit], else 0."""
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return seconds if 0.0 <= seconds <= limit else 0.0


def rsh(network: str | None = None, url: str | None = None, *, config: RedisConfig | None = None,
        secret: str | bytes | None = None, redis_outage_timeout: float | None = None) -> Rush:
    """Connect to (or create) network ``network`` and return its controller.

    Redis: ``config``, else ``url``, else ``RUSH_HPC_URL``/``REDIS_URL``, else an embedded
    redis-server started for this controller on 127.0.0.1 with a generated password.

    ``redis_outage_timeout``: how long the controller and its workers retry through a Redis outage
    (a restart, a network blip) before giving up; default 60 s (5 s with the embedded Redis, which
    is only gone when this controller is).
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
        return Rush(network or uuid.uuid4().hex, resolved, resolve_secret(secret), embedded)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
