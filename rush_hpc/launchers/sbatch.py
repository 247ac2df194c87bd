"""Workers as ONE SLURM job array from a readable job script template (``rush_hpc/templates/sbatch.sh``).

``render`` is a pure function of the options; ``rush.sbatch_script()`` shows its result without
submitting. Directives are sorted and every value is shell-quoted; values with line breaks are
refused (they would inject lines); secrets never enter the script (it only names the 0600
credentials file). Users may pass their own template file (``template=``).
"""

from __future__ import annotations

import os
import shlex
import string
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .. import defaults
from ..exceptions import CommandError, ConfigError, LaunchError
from ..spawner import job_groups
from .base import DIRECTIVE_NAME, JOB_ID, Handle, Launcher, WorkerCommand, call, check_line, check_name, check_no_nul
from .login import LoginNode
from .slurm import (JobShare, SbatchHandle, check_cpus_per_worker, check_workers_per_job, job_comment,
                    time_to_minutes)

DEFAULTS: dict[str, Any] = {
    "template": None, "job_name": defaults.SLURM_JOB_NAME, "partition": None, "time": defaults.SLURM_TIME,
    "cpus_per_worker": 1, "mem": None, "account": None, "qos": None, "gpus": None,
    "max_parallel": None, "setup": (), "extra_directives": {}, "python": None,
    "signal_delay_s": defaults.SIGNAL_DELAY_S, "sbatch": "sbatch", "workers_per_job": 1,
}
_ONE_LINE = ("template", "job_name", "partition", "time", "cpus_per_worker", "mem", "account", "qos", "gpus",
             "max_parallel", "python", "signal_delay_s", "sbatch")


def default_template() -> str:
    return resources.files("rush_hpc.templates").joinpath("sbatch.sh").read_text()


def _flag(name: str, value: Any) -> str:
    name = name.replace("_", "-")
    return f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}"


def validate_options(options: dict[str, Any], log_dir: Path) -> None:
    """Unknown options list the valid ones; no value may break a line of the job script."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in sorted(DEFAULTS.items()))
        raise ConfigError(f"unknown sbatch option(s) {sorted(unknown)}; valid options (defaults): {valid}")
    check_line("log_dir", str(log_dir))
    for name in _ONE_LINE:
        check_line(name, options.get(name))
    setup = options.get("setup") or ()
    if isinstance(setup, str):
        raise ConfigError("setup must be a list of shell lines, got a string")
    for line in setup:
        check_no_nul("setup", line)
    for name, value in dict(options.get("extra_directives") or {}).items():
        check_name("extra_directives", name.replace("_", "-") if isinstance(name, str) else name, DIRECTIVE_NAME)
        check_line(f"extra_directives[{name!r}]", value)


class SbatchLauncher(Launcher):
    """With ``login`` (a ``LoginNode``) the job script is written and submitted on that login node
    over SSH, and ``log_dir`` is a directory there (absolute, or relative to the remote home)."""

    name = "sbatch"

    def __init__(self, log_dir: str | os.PathLike[str], login: LoginNode | None = None, **options: Any) -> None:
        super().__init__()
        self.login = login
        # on a login node: created, checked (with every directory above it) and resolved at once
        self.log_dir = Path(login.private_directory(login.absolute(str(log_dir)))) if login is not None \
            else Path(log_dir)
        validate_options(options, self.log_dir)
        self.options = {**DEFAULTS, **options}
        check_workers_per_job(self.options["workers_per_job"])
        if self.options["cpus_per_worker"] is not None:  # None: no --cpus-per-task line
            self.options["cpus_per_worker"] = check_cpus_per_worker(self.options["cpus_per_worker"])
        # on a login node: the cluster's python3 (after the setup lines, e.g. a venv's activate)
        self.python = self.options["python"] or ("python3" if login is not None else sys.executable)
        template = self.options["template"]
        try:
            self.template = Path(template).read_text() if template else default_template()
        except OSError as error:
            raise ConfigError(f"cannot read the job script template {template}: {error}") from None

    def directives(self, n_jobs: int, batch_id: str) -> dict[str, Any]:
        """The job array's directives: ``n_jobs`` array tasks of ``workers_per_job`` workers each."""
        o = self.options
        minutes = time_to_minutes(o["time"])
        array = f"0-{n_jobs - 1}" + (f"%{o['max_parallel']}" if o["max_parallel"] else "")
        cpus = None if o["cpus_per_worker"] is None else o["cpus_per_worker"] * o["workers_per_job"]
        directives: dict[str, Any] = {
            "job-name": o["job_name"], "array": array, "cpus-per-task": cpus,
            "output": str(self.log_dir / f"rush-{batch_id}-%a.out"),
            "error": str(self.log_dir / f"rush-{batch_id}-%a.err"),
            "time": minutes, "partition": o["partition"], "mem": o["mem"], "account": o["account"],
            "qos": o["qos"], "gpus": o["gpus"],
            # B: = the batch shell, which exec's the worker; signal_delay_s before the time limit
            "signal": f"B:USR2@{o['signal_delay_s']}" if o["signal_delay_s"] else None,
        }
        directives.update(o["extra_directives"])
        return {k: v for k, v in directives.items() if v is not None and v is not False}

    def render(self, n_workers: int, command: WorkerCommand, batch_id: str,
               worker_ids: Sequence[str] | None = None) -> str:
        """The job script text for ``n_workers`` workers (``workers_per_job`` > 1: each array task
        gets its ids as one comma-separated ``--worker-id a,b``, and one interpreter forks them)."""
        ids = list(worker_ids) if worker_ids is not None else [f"<worker-{i}>" for i in range(n_workers)]
        jobs = [",".join(group) for group in job_groups(ids, self.options["workers_per_job"])]
        for name, value in command.environment().items():
            check_line(f"environment variable {name}", value)
        values = {
            "directives": "\n".join(_flag(k, v) for k, v in sorted(
                {"comment": job_comment(command.network),  # proves the jobs are this network's (see ``ours``)
                 **self.directives(len(jobs), batch_id)}.items())),
            "setup": "\n".join(self.options["setup"]) or ":",
            "worker_ids": " ".join(shlex.quote(i) for i in jobs),
            "environment": "\n".join(command.export_lines()),
            "python": shlex.quote(command.python),
            "network": shlex.quote(command.network),
        }
        try:
            return string.Template(self.template).substitute(values)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"job script template: bad placeholder {error}; valid placeholders: "
                              f"{sorted(values)} (write $$ for a literal $)") from None

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        batch_id = uuid.uuid4().hex[:12]
        text = self.render(len(worker_ids), command, batch_id, worker_ids)
        submit = [self.options["sbatch"], "--parsable", "--"]
        if self.login is not None:
            script = self.login.write_private_file(str(self.log_dir), f"rush-{batch_id}-", text.encode())
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            script = str(self.log_dir / f"rush-{batch_id}.sh")
            Path(script).write_text(text)
        try:
            output = (self.login.call if self.login is not None else call)([*submit, script], timeout=60)
        except CommandError as error:
            if error.returncode != -1:
                raise
            # timed out or cut off after sbatch was sent: never re-sent (it would submit twice); the
            # records are marked failed, so workers of a job that was submitted after all refuse to run
            raise LaunchError(f"sbatch may or may not have submitted {script} ({error.stderr.strip()[:300]}); "
                              "if it did, its workers refuse to start (their records are marked failed): "
                              "check `squeue --me` and scancel the job", maybe_started=True) from None
        # --parsable prints "id[;cluster]"; a site's wrapper or job_submit plugin may print lines before it
        lines = output.strip().splitlines()
        job_id = lines[-1].strip().split(";")[0] if lines else ""
        if not JOB_ID.fullmatch(job_id):  # sbatch exited 0: the job may well exist
            raise LaunchError(f"sbatch succeeded but printed no job id (got {output.strip()[:200]!r}); script "
                              f"{script}: if a job was submitted, its workers refuse to start (their records are "
                              "marked failed): check `squeue --me` and scancel it", maybe_started=True)
        handles: list[Handle] = []
        for i, group in enumerate(job_groups(worker_ids, self.options["workers_per_job"])):
            share = JobShare(group) if len(group) > 1 else None
            for worker_id in group:
                handle = SbatchHandle(worker_id, f"{job_id}_{i}", job_script=script, login=self.login, share=share,
                                      stdout=str(self.log_dir / f"rush-{batch_id}-{i}.out"),
                                      stderr=str(self.log_dir / f"rush-{batch_id}-{i}.err"))
                self.handles[worker_id] = handle
                handles.append(handle)
        return handles
