"""The job script: rendered by a pure function, checked against a golden file (no cluster needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import rush_hpc
from rush_hpc import ConfigError
from rush_hpc.launchers.base import WorkerCommand
from rush_hpc.launchers.sbatch import SbatchLauncher, default_template

GOLDEN = Path(__file__).parent.parent / "golden" / "sbatch.sh"


def render_golden(python="/opt/venv/bin/python", network="golden-net") -> str:
    launcher = SbatchLauncher("/shared/rush logs", partition="cpu", time="02:00:00", mem="4G",
                              account="proj-1", max_parallel=2, setup=["module load python/3.11"],
                              extra_directives={"constraint": "a'; echo foo", "exclusive": True},
                              job_name="rush worker")
    command = WorkerCommand(network, python, {"RUSH_HPC_CREDENTIALS": "/shared/rush logs/credentials.json"}, "sbatch")
    return launcher.render(3, command, "batch1", ["w0", "w1", "w2"])


def test_rendered_script_matches_the_golden_file():
    if os.environ.get("RUSH_HPC_UPDATE_GOLDEN"):
        GOLDEN.write_text(render_golden())
    assert render_golden() == GOLDEN.read_text()


def test_rendered_script_quotes_every_value_and_bash_parses_it(tmp_path):
    script = render_golden(python="/opt/my env/bin/python", network="n")
    assert "#SBATCH --constraint='a'\"'\"'; echo foo'" in script
    assert "exec '/opt/my env/bin/python' -m rush_hpc worker" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_unknown_sbatch_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown sbatch option\(s\) \['partiton'\].*partition=None"):
        SbatchLauncher("/tmp/logs", partiton="cpu")


def test_a_users_own_template_is_used(tmp_path):
    template = tmp_path / "job.sh"
    template.write_text("#!/bin/sh\n${directives}\n# mine\n${setup}\n${environment}\n"
                        "exec ${python} -m rush_hpc worker --network ${network} # ${worker_ids}\n")
    script = SbatchLauncher("/logs", template=str(template)).render(2, WorkerCommand("n", "/py"), "b", ["a", "b"])
    assert "# mine" in script and "#SBATCH --array=0-1" in script
    template.write_text("${nope}")
    with pytest.raises(ConfigError, match="bad placeholder 'nope'"):
        SbatchLauncher("/logs", template=str(template)).render(1, WorkerCommand("n", "/py"), "b")


def test_the_default_template_ships_inside_the_package():
    assert default_template() == (Path(rush_hpc.__file__).parent / "templates" / "sbatch.sh").read_text()


