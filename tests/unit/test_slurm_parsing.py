"""sacct / squeue / scancel through the one subprocess seam, with canned scheduler output."""

from __future__ import annotations

import pytest

from rush_hpc.launchers.base import InvalidInfo
from rush_hpc.launchers.slurm import (SlurmHandle, parse_sacct, parse_squeue, pending_fix, sacct_states,
                                      scancel, time_to_minutes)

from .fakes import install

# what `sacct -D -X -n -P -o JobID,State` printed for an array whose element 1 was on a node that
# failed: the NODE_FAIL record, then the requeued one (PENDING), oldest first
SACCT_REQUEUED = """\
41_0|RUNNING
41_1|NODE_FAIL
41_1|PENDING
41_2|CANCELLED by 0
41_3|COMPLETED
41_4|TIMEOUT
41_4|RUNNING
junk line without separator
41_x|FAILED
"""


def test_sacct_with_duplicates_keeps_the_first_ended_record():
    states = parse_sacct(SACCT_REQUEUED)
    assert states == {"41_0": "RUNNING", "41_1": "NODE_FAIL", "41_2": "CANCELLED", "41_3": "COMPLETED",
                      "41_4": "TIMEOUT"}


def test_one_sacct_call_for_a_batch_of_jobs_with_duplicates(monkeypatch):
    fake = install(monkeypatch, {"sacct": SACCT_REQUEUED})
    handles = [SlurmHandle(f"w{i}", f"41_{i}") for i in range(5)] + [SlurmHandle("other", "42")]
    reasons = SlurmHandle.check(handles)
    assert reasons == {"w1": "SLURM job 41_1 ended NODE_FAIL", "w2": "SLURM job 41_2 ended CANCELLED",
                       "w3": "SLURM job 41_3 ended COMPLETED", "w4": "SLURM job 41_4 ended TIMEOUT"}
    (cmd,) = fake.of("sacct")
    assert "-D" in cmd and "-X" in cmd and cmd[-2:] == ["-j", "41_0,41_1,41_2,41_3,41_4,42"]


def test_final_states_of_ended_workers(monkeypatch):
    install(monkeypatch, {"sacct": SACCT_REQUEUED})
    final = SlurmHandle.final_states([SlurmHandle("a", "41_0"), SlurmHandle("b", "41_2")])
    assert final == {"b": "CANCELLED"}


def test_sacct_failure_means_unknown_not_ended(monkeypatch):
    fake = install(monkeypatch, {})
    assert SlurmHandle.check([SlurmHandle("w", "7")]) == {}
    assert fake.of("sacct")


def test_squeue_pending_reasons_that_never_clear_name_the_job_and_the_fix(monkeypatch):
    out = "50_0|PENDING|PartitionTimeLimit\n50_1|PENDING|Priority\n51_0|PENDING|QOSMaxWallDurationPerJobLimit\n" \
          "52_0|RUNNING|None\n53_0|PENDING|InvalidAccount\n"
    fake = install(monkeypatch, {"squeue": out})
    handles = [SlurmHandle("a", "50_0"), SlurmHandle("b", "50_1"), SlurmHandle("c", "51_0"),
               SlurmHandle("d", "52_0"), SlurmHandle("e", "53_0")]
    problems = SlurmHandle.start_problems(handles)
    assert set(problems) == {"a", "c", "e"}
    assert "50_0" in problems["a"] and "PartitionTimeLimit" in problems["a"] and "time=" in problems["a"]
    assert "account=" in problems["e"]
    (cmd,) = fake.of("squeue")
    assert cmd[-2:] == ["-j", "50,51,52,53"] and "-r" in cmd


def test_parse_squeue_ignores_garbage():
    assert parse_squeue("1_2|PENDING|Resources\nnot|a|job|line\n--user=x|PENDING|x\n") == \
        {"1_2": ("PENDING", "Resources")}


@pytest.mark.parametrize("reason, permanent", [
    ("PartitionTimeLimit", True), ("PartitionConfig", True), ("InvalidQOS", True), ("JobHeldUser", True),
    ("QOSMaxCpuPerJobLimit", True), ("QOSMinCpuNotSatisfied", True),
    ("Priority", False), ("Resources", False), ("QOSMaxJobsPerUserLimit", False), ("BeginTime", False),
])
def test_pending_fix(reason, permanent):
    assert (pending_fix(reason) is not None) is permanent


def test_scancel_passes_validated_ids_after_double_dash(monkeypatch):
    fake = install(monkeypatch, {"scancel": ""})
    SlurmHandle.kill_all([SlurmHandle("a", "9_1"), SlurmHandle("b", "9_0"), SlurmHandle("c", "9_1")])
    assert fake.of("scancel") == [["scancel", "--", "9_0", "9_1"]]
    with pytest.raises(InvalidInfo):
        scancel(["--user=alice"])
    assert len(fake.of("scancel")) == 1


@pytest.mark.parametrize("job_id", ["--user=alice", "1 2", "12_", "_3", "12_3_4", "12;rm", "", "12\n13"])
def test_job_ids_that_could_be_options_or_lists_are_refused(job_id, monkeypatch):
    fake = install(monkeypatch, {"sacct": "", "scancel": ""})
    with pytest.raises(InvalidInfo):
        sacct_states([job_id])
    assert fake.calls == []


@pytest.mark.parametrize("value, minutes", [
    (None, None), (30, 30), ("30", 30), ("1:30", 2), ("01:00:00", 60), ("02:30:00", 150), ("1-00:00", 1440),
    ("1-2", 1560), ("1-02:03:04", 1564), ("0:10", 1),
])
def test_time_to_minutes(value, minutes):
    assert time_to_minutes(value) == minutes


@pytest.mark.parametrize("value", ["1h", "abc", "1:2:3:4", "-5"])
def test_bad_times_are_refused(value):
    from rush_hpc import ConfigError

    with pytest.raises(ConfigError, match="time must be"):
        time_to_minutes(value)


def test_the_supervisor_reports_a_pending_reason_only_when_two_checks_agree(monkeypatch):
    """Right after sbatch, SLURM shows PartitionConfig for a moment even when the job's real
    problem is PartitionTimeLimit: a single sighting is not reported."""
    from rush_hpc import defaults
    from rush_hpc.supervisor import Supervisor

    answers = iter(["60_0|PENDING|PartitionConfig\n", "60_0|PENDING|PartitionTimeLimit\n",
                    "60_0|PENDING|PartitionTimeLimit\n"])
    fake = install(monkeypatch, {"squeue": lambda cmd: next(answers)})
    monkeypatch.setattr(defaults, "SQUEUE_INTERVAL_S", 0.0)
    supervisor = Supervisor(network=None)  # type: ignore[arg-type] - start_problems needs no Redis
    waiting = {"w": {"launcher": "sbatch", "job_id": "60_0", "state": "launched"}}
    assert supervisor.start_problems(waiting) == {}
    assert supervisor.start_problems(waiting) == {}  # changed: not confirmed yet
    assert "PartitionTimeLimit" in supervisor.start_problems(waiting)["w"]
    assert len(fake.of("squeue")) == 3
