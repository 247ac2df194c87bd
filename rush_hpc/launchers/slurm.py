"""Workers as SLURM jobs: ``SlurmHandle`` (the scheduler's view, shared by both SLURM launchers)
and ``SubmititLauncher`` (one job array through submitit).

The scheduler's truth comes from ``sacct -D`` (accounting must be on; submitit needs it too), read
once per batch of job ids: a job whose record ended TIMEOUT, PREEMPTED, OUT_OF_MEMORY, NODE_FAIL,
CANCELLED or FAILED gives that reason to its worker, even when SLURM requeued the job (``-D`` shows
the ended record before the requeued one). The jobs of lost and killed workers are cancelled, so
a requeued array element cannot start a worker later. Pending jobs are checked with ``squeue``:
a reason that will not clear by waiting (a time limit above the partition's, a bad account, ...)
is reported at once with the fix.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .. import defaults
from ..exceptions import CommandError, ConfigError, LaunchError
from .base import (Handle, HandleContext, InvalidInfo, Launcher, WorkerCommand, WorkerInfo, call,
                   check_line, check_name, check_no_nul, read_tail, valid_job_id, valid_worker_id)

if TYPE_CHECKING:
    from .login import LoginNode

logger = logging.getLogger(__name__)

#: how SLURM's client commands are run: ``base.call`` here, ``LoginNode.call`` on a login node
Run = Callable[..., str]

ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED", "REQUEUED"})

#: squeue pending reasons that waiting will not clear, with what to do about them
PENDING_FOREVER: dict[str, str] = {
    "PartitionTimeLimit": "the job's time limit is above the partition's MaxTime: pass a shorter time= "
                          "or another partition= (see `sinfo -o '%P %l'`)",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows: pick another partition=",
    "PartitionConfig": "no node of the partition has what one job asks for (cpus_per_worker, mem, gpus): "
                       "ask for less or pick another partition=",
    "InvalidAccount": "the account does not exist or you are not in it: pass a valid account= "
                      "(see `sacctmgr show assoc user=$USER`)",
    "InvalidQOS": "the QOS does not exist or is not allowed for your account: pass a valid qos=",
    "AccountNotAllowed": "the partition does not accept this account: pass another account= or partition=",
    "QOSNotAllowed": "the partition does not accept this QOS: pass another qos= or partition=",
    "BadConstraints": "the job's constraints cannot be met by any node: change the constraint",
    "DependencyNeverSatisfied": "the job depends on a job that failed: cancel it",
    "JobHeldAdmin": "an administrator holds the job: ask them, or cancel it",
    "JobHeldUser": "the job is held: `scontrol release <job id>`, or cancel it",
}
#: QOS limits that apply to one job (not to the user's other jobs): they never clear either
_QOS_PER_JOB = re.compile(r"^QOS(Max\w*PerJob\w*|Min\w+|MaxWallDurationPerJobLimit)$")


def pending_fix(reason: str) -> str | None:
    """What to do about a pending reason that will not clear by waiting, or None if it may clear."""
    if reason in PENDING_FOREVER:
        return PENDING_FOREVER[reason]
    if _QOS_PER_JOB.match(reason):
        return "a per-job limit of the QOS is exceeded: ask for less (time, cpus, mem) or pass another qos="
    return None


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


JOB_ID_OR_STEP = re.compile(r"^\d+(_\d+)?$")
#: submitit additional_parameters names (submitit turns ``_`` into ``-``)
SUBMITIT_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


# -- sacct / squeue / scancel (through the one subprocess seam, ``call``) ----------------------
def parse_sacct(output: str) -> dict[str, str]:
    """``sacct -D -X -n -P -o JobID,State`` output -> ``{job_id: state}``.

    With ``-D`` a requeued job has several records (oldest first): the first record that ended is
    what happened to the worker that ran (NODE_FAIL, PREEMPTED...), whatever the requeued job
    does later; a job that has not ended yet keeps its latest state.
    """
    states: dict[str, str] = {}
    ended: dict[str, str] = {}
    for line in output.splitlines():
        job_id, sep, state = line.partition("|")
        job_id = job_id.strip()
        if not sep or not JOB_ID_OR_STEP.fullmatch(job_id):
            continue
        word = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        states[job_id] = word
        if word in ENDED_STATES and job_id not in ended:
            ended[job_id] = word
    return {**states, **ended}


#: job ids per sacct / squeue / scancel command (a command line has a length limit, and forged
#: records in Redis must not be able to push our own jobs out of it)
IDS_PER_COMMAND = 500


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    return [list(ids[i:i + IDS_PER_COMMAND]) for i in range(0, len(ids), IDS_PER_COMMAND)]


def sacct_states(job_ids: Sequence[str], run: Run | None = None) -> dict[str, str]:
    """``{job_id: final or current state}`` for these jobs, one sacct call per 500 ids (a chunk
    whose call fails is left out: unknown)."""
    states: dict[str, str] = {}
    for ids in _chunks(sorted({valid_job_id(j) for j in job_ids})):
        try:
            output = (run or call)(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                                   timeout=30)
        except CommandError as error:
            logger.warning("sacct failed, SLURM job states unknown: %s", error)
            continue
        states.update(parse_sacct(output))
    return states


def parse_squeue(output: str) -> dict[str, tuple[str, str]]:
    """``squeue -h -r -o '%i|%T|%r'`` output -> ``{job_id: (state, reason)}``."""
    jobs: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        parts = line.strip().split("|", 2)  # the last field may be a comment with "|" in it
        if len(parts) == 3 and JOB_ID_OR_STEP.fullmatch(parts[0]):
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


def squeue_jobs(job_ids: Sequence[str], run: Run | None = None,
                fields: str = "%i|%T|%r") -> dict[str, tuple[str, str]]:
    """``{job_id: (state, reason)}`` of these jobs (array elements one by one), one squeue call per
    500 arrays; ``fields`` ``"%i|%T|%k"`` gives the job's comment instead of the reason."""
    jobs: dict[str, tuple[str, str]] = {}
    for arrays in _chunks(sorted({valid_job_id(j).split("_")[0] for j in job_ids})):
        try:
            output = (run or call)(["squeue", "-h", "-r", "-o", fields, "-j", ",".join(arrays)], timeout=30)
        except CommandError as error:
            logger.debug("squeue failed: %s", error)
            continue
        jobs.update(parse_squeue(output))
    return jobs


def scancel(job_ids: Sequence[str], run: Run | None = None) -> None:
    """Cancel these jobs; validated ids after ``--``, so none can pass for an option."""
    for ids in _chunks(sorted({valid_job_id(j) for j in job_ids})):
        try:
            (run or call)(["scancel", "--", *ids], timeout=30)
        except CommandError as error:
            logger.warning("scancel failed: %s", error)


def job_comment(network: str) -> str:
    """The comment every worker job of ``network`` is submitted with: what lets a controller that
    did not submit a job (its handle came from Redis) prove that the job is one of the network's
    before it cancels it."""
    return f"rush-hpc:{network}"


def ours(handles: Sequence[SlurmHandle]) -> list[SlurmHandle]:
    """The handles whose job may be cancelled by us: trusted ones (we submitted the job), and
    those from Redis whose job SLURM shows with this network's comment. A Redis writer can name
    any job id in a worker record; without this, a forged "lost" worker would cancel any job of
    the user."""
    trusted = [h for h in handles if h.trusted]
    groups: dict[int, list[SlurmHandle]] = {}
    for handle in handles:
        if not handle.trusted:
            groups.setdefault(id(handle.login), []).append(handle)
    for members in groups.values():
        comments = squeue_jobs([h.job_id for h in members], members[0].run, fields="%i|%T|%k")
        for handle in members:
            comment = (comments.get(handle.job_id) or ("", ""))[1]
            if handle.network and comment == job_comment(handle.network):
                trusted.append(handle)
            elif handle.job_id in comments:
                logger.warning("worker %s: SLURM job %s is not a job of network %r (comment %r): not cancelled",
                               handle.worker_id, handle.job_id, handle.network, comment[:100])
    return trusted


class JobShare:
    """The workers of one SLURM job that runs several (``workers_per_job``): cancelling the job
    kills all of them, so it is cancelled only once every one of them ended. ``ended`` holds the
    ones known to have ended: killed or lost through this handle, and those the supervisor found
    in a final state (terminated, failed, killed, lost) before it cancels. Until then a lost or
    killed one is ended by its own heartbeat child."""

    def __init__(self, worker_ids: Sequence[str]) -> None:
        self.worker_ids = tuple(worker_ids)
        self.ended: set[str] = set()


class SlurmHandle(Handle):
    """A worker that runs as one SLURM job (array element ``123_4``). Trusted handles also hold
    the job's output paths; handles from Redis hold only a validated job id. Jobs submitted on a
    login node (``login``) are asked about and cancelled there, over the controller's own SSH
    connection; a handle from Redis naming a login node this controller does not hold is not built."""

    launcher = "slurm"
    always_force_kill = True  # scancel frees the allocation even when the worker already exited
    kill_when_lost = True  # a lost worker's job may still run, or be requeued and start again later
    kill_record = "cancelled_at"
    reports_final_state = True

    def __init__(self, worker_id: str, job_id: str, *, stdout: str | None = None, stderr: str | None = None,
                 job_script: str | None = None, login: LoginNode | None = None, share: JobShare | None = None,
                 trusted: bool = True) -> None:
        super().__init__(worker_id, trusted=trusted)
        self.job_id = valid_job_id(job_id)
        self.stdout, self.stderr, self.job_script = stdout, stderr, job_script
        self.login = login
        self.share = share
        self.network: str | None = None  # for handles from Redis: the network whose job it must be

    @property
    def run(self) -> Run:
        return self.login.call if self.login is not None else call

    def to_info(self) -> dict[str, str]:
        info = {"launcher": self.launcher, "job_id": self.job_id}
        if self.login is not None:
            info["login"] = self.login.label
        if self.share is not None:
            info["job_workers"] = ",".join(self.share.worker_ids)
        for name in ("stdout", "stderr", "job_script"):
            if getattr(self, name):
                info[name] = getattr(self, name)
        return info

    @classmethod
    def from_info(cls, worker_id: str, info: WorkerInfo, context: HandleContext) -> SlurmHandle:
        login = None
        if info.get("login"):
            login = next((node for node in context.logins if node.label == info.get("login")), None)
            if login is None:
                raise InvalidInfo(f"login node {info.get('login')!r} is not one of this controller's")
        share = None
        if info.get("job_workers"):
            ids = [valid_worker_id(w) for w in str(info["job_workers"]).split(",")]
            if worker_id not in ids:
                raise InvalidInfo(f"job_workers of worker {worker_id} do not name it")
            share = JobShare(ids)
        handle = cls(worker_id, valid_job_id(info.get("job_id")), login=login, share=share, trusted=False)
        handle.network = context.network
        return handle

    @classmethod
    def _by_login(cls, handles: Sequence[Handle]) -> list[tuple[Run, dict[str, str]]]:
        """The handles' ``{worker_id: job_id}`` per place their jobs live (here, or a login node),
        so that each place is asked once per batch."""
        groups: dict[int, tuple[Run, dict[str, str]]] = {}
        for handle in handles:
            if isinstance(handle, SlurmHandle):
                groups.setdefault(id(handle.login), (handle.run, {}))[1][handle.worker_id] = handle.job_id
        return list(groups.values())

    @classmethod
    def final_states(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """``{worker_id: final SLURM state}`` of the handles whose job has ended (one sacct call per place)."""
        ended: dict[str, str] = {}
        for run, jobs in cls._by_login(handles):
            states = sacct_states(list(jobs.values()), run)
            ended.update({w: states[j] for w, j in jobs.items() if states.get(j) in ENDED_STATES})
        return ended

    @classmethod
    def check(cls, handles: Sequence[Handle]) -> dict[str, str]:
        jobs = {h.worker_id: h.job_id for h in handles if isinstance(h, SlurmHandle)}
        return {w: f"SLURM job {jobs[w]} ended {state}" for w, state in cls.final_states(handles).items()}

    @classmethod
    def start_problems(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """Pending jobs that will not start by waiting: ``{worker_id: reason with the fix}``."""
        problems = {}
        for run, jobs in cls._by_login(handles):
            queue = squeue_jobs(list(jobs.values()), run)
            for worker_id, job_id in jobs.items():
                state, reason = queue.get(job_id) or queue.get(job_id.split("_")[0]) or ("", "")
                fix = pending_fix(reason) if state == "PENDING" else None
                if fix:
                    problems[worker_id] = f"SLURM job {job_id} is pending for reason {reason}, which will not " \
                                          f"clear by waiting: {fix}"
        return problems

    def kill(self) -> None:
        type(self).kill_all([self])

    @classmethod
    def kill_all(cls, handles: Sequence[Handle]) -> None:
        slurm = [h for h in handles if isinstance(h, SlurmHandle)]
        for run, jobs in cls._by_login(cancellable(ours(slurm))):
            scancel(list(jobs.values()), run)

    def output_tail(self, lines: int = defaults.OUTPUT_TAIL_LINES) -> str:
        if not self.trusted:
            return ""
        if self.login is not None:
            return self.login.read_tail(self.stderr, lines) or self.login.read_tail(self.stdout, lines)
        return read_tail(self.stderr, lines) or read_tail(self.stdout, lines)


def cancellable(handles: Sequence[Handle]) -> list[SlurmHandle]:
    """The handles whose job may be cancelled now: its own job, or a shared job whose every
    worker is among ``handles`` or was killed / lost before (see ``JobShare``)."""
    ending = {h.worker_id for h in handles}
    chosen = []
    for handle in handles:
        if not isinstance(handle, SlurmHandle):
            continue
        share = handle.share
        if share is not None:
            share.ended.add(handle.worker_id)
            if not set(share.worker_ids) <= share.ended | ending:
                logger.info("worker %s: SLURM job %s still runs other workers; not cancelled",
                            handle.worker_id, handle.job_id)
                continue
        chosen.append(handle)
    return chosen


class SbatchHandle(SlurmHandle):
    """A worker started from a job script template (same scheduler view as ``SlurmHandle``)."""

    launcher = "sbatch"


def run_submitit_worker(network: str, worker_id: str | Sequence[str], environment: Mapping[str, str] | str) -> int:
    """What each submitit array task runs (in submitit's process, on the node): the worker
    command's environment (credentials file, launcher name), then the worker itself, or - given
    several ids (``workers_per_job``) - one forked worker per id (``spawner.run_group``: one import
    per job, stop signals passed on).

    In-process on purpose, not ``python -m rush_hpc worker`` as a child (submitit's
    ``CommandFunction``): submitit's handler for the time-limit signal (USR2) would requeue the
    job or raise, while ``run_worker`` installs the same graceful handlers every worker has."""
    if isinstance(environment, str):  # jobs pickled by an older controller passed the credentials path
        environment = {"RUSH_HPC_CREDENTIALS": environment, "RUSH_HPC_LAUNCHER": "slurm"}
    os.environ.update(environment)
    credentials = os.environ["RUSH_HPC_CREDENTIALS"]
    import logging as _logging

    from ..bootstrap import run_worker
    from ..credentials import read_credentials

    _logging.basicConfig(level=_logging.INFO, stream=sys.stderr)
    if not isinstance(worker_id, str):
        from ..spawner import run_group

        return run_group(network, list(worker_id))
    config, secret = read_credentials(credentials)
    return run_worker(network, worker_id, config, secret)


def check_cpus_per_worker(value: Any) -> int:
    """``cpus_per_worker``: a positive int (a job asks for it times ``workers_per_job``); a
    string of digits is taken as that number."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"cpus_per_worker must be a positive integer, got {value!r}")
    return value


def check_workers_per_job(value: Any) -> int:
    """``workers_per_job``: a positive int (each job gets that many times ``cpus_per_worker``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"workers_per_job must be a positive integer, got {value!r}")
    return value


def check_slurm_values(options: Mapping[str, Any], names: Sequence[str]) -> None:
    """CR/LF/NUL in any of these options would inject lines into the job script."""
    for name in names:
        value = options.get(name)
        if isinstance(value, (list, tuple)):
            for item in value:
                check_line(name, item)
        else:
            check_line(name, value)


class SubmititLauncher(Launcher):
    """One submitit job array for all workers; submitit's own parameter names are accepted too."""

    name = "slurm"

    def __init__(self, log_dir: str | os.PathLike[str], *, partition: str | None = None,
                 time: str | int | None = defaults.SLURM_TIME, cpus_per_worker: int = 1, mem: str | None = None,
                 account: str | None = None, qos: str | None = None, gpus: int | None = None,
                 max_parallel: int | None = None, setup: Sequence[str] = (),
                 additional_parameters: Mapping[str, Any] | None = None, python: str | None = None,
                 signal_delay_s: int = defaults.SIGNAL_DELAY_S, job_name: str = defaults.SLURM_JOB_NAME,
                 workers_per_job: int = 1, **submitit_parameters: Any) -> None:
        super().__init__()
        self.workers_per_job = check_workers_per_job(workers_per_job)
        cpus_per_worker = check_cpus_per_worker(cpus_per_worker)
        check_line("log_dir", str(log_dir))
        self.log_dir = Path(log_dir)
        self.python = check_line("python", python or sys.executable)
        check_slurm_values({"partition": partition, "time": time, "mem": mem, "account": account, "qos": qos,
                            "gpus": gpus, "job_name": job_name}, ["partition", "time", "mem", "account",
                                                                  "qos", "gpus", "job_name"])
        for line in setup:
            check_no_nul("setup", line)
        extra = dict(additional_parameters or {})
        for key, value in extra.items():
            check_name("additional_parameters", key, SUBMITIT_NAME)
            check_line(f"additional_parameters[{key!r}]", value)
        for key, value in submitit_parameters.items():
            check_line(key, value)
        parameters: dict[str, Any] = {
            "partition": partition, "time": time_to_minutes(time), "cpus_per_task": cpus_per_worker * workers_per_job,
            "mem": mem, "account": account, "qos": qos, "gpus_per_node": gpus,
            # set -e: a failing setup line fails the job instead of starting a broken worker
            "setup": ["set -e", *setup], "additional_parameters": extra,
            "signal_delay_s": signal_delay_s, "job_name": job_name, **submitit_parameters}
        self.max_parallel = max_parallel
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    def executor(self, n_workers: int) -> Any:
        import submitit

        # submitit pastes ``python`` into the script verbatim: quote it (paths with spaces)
        executor = submitit.SlurmExecutor(folder=self.log_dir / "submitit" / "%j", python=shlex.quote(self.python))
        try:
            executor.update_parameters(array_parallelism=self.max_parallel or n_workers, **self.parameters)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"invalid SLURM parameter: {error}") from None
        return executor

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        from ..spawner import job_groups

        groups = job_groups(worker_ids, self.workers_per_job)
        executor = self.executor(len(groups))
        if "comment" not in self.parameters and "comment" not in self.parameters.get("additional_parameters", {}):
            # proves the jobs are this network's (see ``ours``)
            executor.update_parameters(comment=job_comment(command.network))
        environment = command.environment()
        arguments = [g[0] if self.workers_per_job == 1 else g for g in groups]
        try:
            jobs = executor.map_array(run_submitit_worker, [command.network] * len(groups), arguments,
                                      [environment] * len(groups))
        except Exception as error:  # noqa: BLE001 - submitit wraps sbatch failures in several ways
            raise LaunchError(f"submitting the SLURM job array failed: {error}") from None
        handles: list[Handle] = []
        for group, job in zip(groups, jobs):
            share = JobShare(group) if len(group) > 1 else None
            for worker_id in group:
                handle = SlurmHandle(worker_id, job.job_id, stdout=str(job.paths.stdout),
                                     stderr=str(job.paths.stderr), share=share)
                self.handles[worker_id] = handle
                handles.append(handle)
        return handles

