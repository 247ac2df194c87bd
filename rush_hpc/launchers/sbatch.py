"""Workers as ONE SLURM job array from a readable job script template (``templates/sbatch.sh``).

``render`` is a pure function of the options; ``rush.sbatch_script()`` shows its result without
submitting. Directives are sorted and every value is shell-quoted; secrets never enter the script
(it only names the 0600 credentials file).
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

from ..exceptions import ConfigError
from .base import WorkerCommand, call
from .slurm import SlurmJobs, time_to_minutes

DEFAULTS: dict[str, Any] = {
    "template": None, "job_name": "rush-worker", "partition": None, "time": "01:00:00",
    "cpus_per_worker": 1, "mem": None, "account": None, "qos": None, "gpus": None,
    "max_parallel": None, "setup": (), "extra_directives": {}, "python": None, "signal_delay_s": 60,
    "sbatch": "sbatch",
}


def default_template() -> str:
    return resources.files("rush_hpc.templates").joinpath("sbatch.sh").read_text()


def _flag(name: str, value: Any) -> str:
    name = name.replace("_", "-")
    return f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}"


class SbatchLauncher(SlurmJobs):
    name = "sbatch"

    def __init__(self, log_dir: str | os.PathLike[str], **options: Any) -> None:
        super().__init__()
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in sorted(DEFAULTS.items()))
            raise ConfigError(f"unknown sbatch option(s) {sorted(unknown)}; valid options (defaults): {valid}")
        self.options = {**DEFAULTS, **options}
        self.log_dir = Path(log_dir)
        self.python = self.options["python"] or sys.executable
        template = self.options["template"]
        try:
            self.template = Path(template).read_text() if template else default_template()
        except OSError as error:
            raise ConfigError(f"cannot read the job script template {template}: {error}") from None

    def directives(self, n_workers: int, batch_id: str) -> dict[str, Any]:
        o = self.options
        minutes = time_to_minutes(o["time"])
        array = f"0-{n_workers - 1}" + (f"%{o['max_parallel']}" if o["max_parallel"] else "")
        directives: dict[str, Any] = {
            "job-name": o["job_name"], "array": array, "cpus-per-task": o["cpus_per_worker"],
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
        """The job script text for ``n_workers`` workers."""
        ids = list(worker_ids) if worker_ids is not None else [f"<worker-{i}>" for i in range(n_workers)]
        values = {
            "directives": "\n".join(_flag(k, v) for k, v in sorted(self.directives(n_workers, batch_id).items())),
            "setup": "\n".join(self.options["setup"]) or ":",
            "worker_ids": " ".join(shlex.quote(i) for i in ids),
            "environment": "\n".join(command.export_lines()),
            "python": shlex.quote(command.python),
            "network": shlex.quote(command.network),
        }
        try:
            return string.Template(self.template).substitute(values)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"job script template: bad placeholder {error}; valid placeholders: "
                              f"{sorted(values)} (write $$ for a literal $)") from None

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        batch_id = uuid.uuid4().hex[:12]
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        script = self.log_dir / f"rush-{batch_id}.sh"
        script.write_text(self.render(len(worker_ids), command, batch_id, worker_ids))
        output = call([self.options["sbatch"], "--parsable", str(script)], timeout=60)
        job_id = output.strip().split(";")[0]
        return {w: {"launcher": self.name, "job_id": f"{job_id}_{i}", "job_script": str(script),
                    "stdout": str(self.log_dir / f"rush-{batch_id}-{i}.out"),
                    "stderr": str(self.log_dir / f"rush-{batch_id}-{i}.err")}
                for i, w in enumerate(worker_ids)}

