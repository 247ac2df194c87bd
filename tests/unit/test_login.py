"""Submission through a login node (``start_sbatch_workers(login=...)``), the parts that need no
SSH: target parsing, which login node a handle from Redis may use, that every SLURM command of
a login handle goes to that login node, and that an sbatch whose reply was lost is never re-sent."""

from __future__ import annotations

import pytest

from rush_hpc.exceptions import CommandError, ConfigError, LaunchError
from rush_hpc.launchers.base import HandleContext, WorkerCommand, handle_from_info
from rush_hpc.launchers.login import LoginNode, parse_target
from rush_hpc.launchers.sbatch import SbatchLauncher
from rush_hpc.launchers.slurm import SbatchHandle

from .fakes import FakeCommands, install

WID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("target, parsed", [
    ("login1", (None, "login1", None)),
    ("alice@login1", ("alice", "login1", None)),
    ("alice@login1.hpc.example.org:2222", ("alice", "login1.hpc.example.org", 2222)),
])
def test_targets(target, parsed):
    assert parse_target(target) == parsed


@pytest.mark.parametrize("target", ["", "a b", "alice@", "-oProxyCommand=x", "h:0", "h:99999", "h:x",
                                    "host\nx", 42])
def test_bad_targets_are_refused(target):
    with pytest.raises(ConfigError):
        parse_target(target)


class FakeLogin(LoginNode):
    """A LoginNode whose commands are canned answers (no SSH); records what would run there."""

    def __init__(self, target: str, answers: dict) -> None:
        super().__init__(target)
        self.commands = FakeCommands(answers)
        self.files: dict[str, bytes] = {}

    def call(self, cmd, *, timeout=60, input=None):
        return self.commands(cmd)

    def home(self) -> str:
        return "/home/alice"

    def private_directory(self, directory):
        return directory

    def write_private_file(self, directory, prefix, content):
        path = f"{directory}/{prefix}XXXX"
        self.files[path] = content
        return path


def test_a_handle_from_redis_uses_only_a_login_node_of_this_controller():
    login = FakeLogin("alice@login1", {})
    info = {"launcher": "sbatch", "job_id": "12_0", "login": "alice@login1"}
    handle = handle_from_info(WID, info, HandleContext(logins=[login]))
    assert isinstance(handle, SbatchHandle) and handle.login is login and not handle.trusted
    assert handle_from_info(WID, info, HandleContext()) is None  # unknown: not acted on at all
    assert handle_from_info(WID, {**info, "login": "mallory@evil"}, HandleContext(logins=[login])) is None


def test_every_slurm_command_of_a_login_handle_runs_on_its_login_node(monkeypatch):
    here = install(monkeypatch, {})  # any command run on this machine would be recorded here
    login = FakeLogin("alice@login1", {"sacct": "12_0|COMPLETED\n", "squeue": "", "scancel": ""})
    handles = [SbatchHandle(WID, "12_0", login=login), SbatchHandle(WID[::-1], "12_1", login=login)]
    assert SbatchHandle.final_states(handles) == {WID: "COMPLETED"}
    SbatchHandle.start_problems(handles)
    SbatchHandle.kill_all(handles)
    assert [c[0] for c in login.commands.calls] == ["sacct", "squeue", "scancel"]  # one call each, batched
    assert login.commands.of("scancel") == [["scancel", "--", "12_0", "12_1"]]
    assert here.calls == []


def test_sbatch_through_a_login_node_writes_the_script_there_and_reads_the_job_id():
    login = FakeLogin("alice@login1", {"sbatch": "77;cluster\n"})
    launcher = SbatchLauncher("rush logs", login=login, partition="cpu")
    assert str(launcher.log_dir) == "/home/alice/rush logs" and launcher.python == "python3"
    handles = launcher.start(["w1", "w2"], WorkerCommand("net", "python3", {"RUSH_HPC_CREDENTIALS": "/c"}))
    [(script, content)] = login.files.items()
    assert script.startswith("/home/alice/rush logs/rush-") and b"#SBATCH --array=0-1" in content
    assert login.commands.calls == [["sbatch", "--parsable", "--", script]]
    assert [h.job_id for h in handles] == ["77_0", "77_1"] and all(h.login is login for h in handles)


@pytest.mark.parametrize("answer, maybe", [
    (CommandError(["sbatch"], -1, "", "SSH to the login node failed: EOFError"), True),
    (CommandError(["sbatch"], 1, "", "sbatch: error: invalid partition"), False),
    ("not a job id\n", True),  # sbatch exited 0: a job may exist
])
def test_an_sbatch_whose_outcome_is_unknown_is_never_sent_twice(answer, maybe):
    def sbatch(cmd):
        if isinstance(answer, Exception):
            raise answer
        return answer

    login = FakeLogin("alice@login1", {"sbatch": sbatch})
    launcher = SbatchLauncher("/logs", login=login)
    with pytest.raises(LaunchError) as raised:
        launcher.start(["w1"], WorkerCommand("net", "python3"))
    assert len(login.commands.of("sbatch")) == 1
    assert raised.value.maybe_started is maybe


def test_worker_address_changes_only_where_workers_connect():
    from rush_hpc.config import RedisConfig
    from rush_hpc.controller import with_address

    config = RedisConfig(host="localhost", port=6380, password="pw", ssl=True)
    moved = with_address(config, "login1:6390")
    assert (moved.host, moved.port, moved.password, moved.ssl) == ("login1", 6390, "pw", True)
    assert with_address(config, None) is config
    assert with_address(config, "[::1]:6390").host == "::1"
    for bad in ("login1", "login1:", ":6380", "login1:0", "a b:1", "user@login1:1", "login1:http"):
        with pytest.raises(ConfigError):
            with_address(config, bad)
    with pytest.raises(ConfigError, match="Cluster"):
        with_address(RedisConfig(cluster=True), "a:1")
