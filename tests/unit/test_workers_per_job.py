"""Several workers per SLURM job: ids grouped into jobs, the job script, cancelling shared jobs."""

from __future__ import annotations

import subprocess

import pytest

from rush_hpc import ConfigError
from rush_hpc.launchers.base import HandleContext, WorkerCommand
from rush_hpc.launchers.sbatch import SbatchLauncher
from rush_hpc.launchers.slurm import JobShare, SlurmHandle, SubmititLauncher
from rush_hpc.spawner import job_groups, split_ids

from .fakes import install


def test_ids_are_grouped_into_jobs_of_workers_per_job():
    assert job_groups(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert job_groups(["a", "b"], 1) == [["a"], ["b"]]
    assert job_groups(["a"], 4) == [["a"]]
    with pytest.raises(ValueError):
        job_groups(["a"], 0)
    assert split_ids(["a,b", "c", ""]) == ["a", "b", "c"]


def test_the_job_script_gives_each_array_task_its_ids_and_their_cpus(tmp_path):
    launcher = SbatchLauncher("/logs", cpus_per_worker=2, workers_per_job=2)
    script = launcher.render(5, WorkerCommand("n", "/py"), "b", ["w0", "w1", "w2", "w3", "w4"])
    assert "#SBATCH --array=0-2\n" in script and "#SBATCH --cpus-per-task=4\n" in script
    assert "worker_ids=(w0,w1 w2,w3 w4)" in script
    path = tmp_path / "job.sh"  # what array task 1 runs
    path.write_text(script.replace("exec /py", "echo /py"))
    out = subprocess.run(["bash", str(path)], env={"SLURM_ARRAY_TASK_ID": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["--worker-id", "w2,w3"]


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_workers_per_job_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match="workers_per_job"):
        SbatchLauncher("/logs", workers_per_job=value)
    with pytest.raises(ConfigError, match="workers_per_job"):
        SubmititLauncher("/logs", workers_per_job=value)


def test_submitit_jobs_ask_for_the_cpus_of_all_their_workers():
    assert SubmititLauncher("/logs", cpus_per_worker=3, workers_per_job=4).parameters["cpus_per_task"] == 12


def test_a_shared_job_is_cancelled_only_once_every_worker_of_it_ended(monkeypatch):
    fake = install(monkeypatch, {"scancel": ""})
    share = JobShare(["a", "b"])
    a, b = (SlurmHandle(w, "7_0", share=share) for w in ("a", "b"))
    own = SlurmHandle("c", "7_1")
    SlurmHandle.kill_all([a, own])  # b still runs in job 7_0
    assert fake.of("scancel") == [["scancel", "--", "7_1"]]
    b.kill()  # now both ended: the job goes
    assert fake.of("scancel")[-1] == ["scancel", "--", "7_0"]
    SlurmHandle.kill_all([SlurmHandle(w, "8_0", share=JobShare(["x", "y"])) for w in ("x", "y")])
    assert fake.of("scancel")[-1] == ["scancel", "--", "8_0"]  # both in one call


def test_job_workers_round_trip_through_redis_and_are_validated():
    handle = SlurmHandle("a", "7_0", share=JobShare(["a", "b"]))
    info = handle.to_info()
    assert info["job_workers"] == "a,b"
    rebuilt = SlurmHandle.from_info("a", info, HandleContext())
    assert rebuilt.share is not None and rebuilt.share.worker_ids == ("a", "b") and not rebuilt.trusted
    from rush_hpc.launchers.base import InvalidInfo

    for bad in ("b,c", "a,--user=x", "a,"):
        with pytest.raises(InvalidInfo):
            SlurmHandle.from_info("a", {**info, "job_workers": bad}, HandleContext())
