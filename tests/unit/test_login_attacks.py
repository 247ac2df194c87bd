"""Review of issue 16's login-node submission (commit 7691148): attacks on the logic that need no SSH
server (a fake connection at fabric's boundary, or a real LoginNode pointed at a closed loopback port).

Tests marked ``xfail(strict=True, reason="FINDING ...")`` FAIL on the reviewed code: each shows a defect.
"""

from __future__ import annotations

import socket

import pytest

from rush_hpc.exceptions import CommandError, LaunchError
from rush_hpc.launchers.base import WorkerCommand
from rush_hpc.launchers.login import LoginNode
from rush_hpc.launchers.sbatch import SbatchLauncher
from rush_hpc.launchers.slurm import SbatchHandle, sacct_states, scancel, squeue_jobs

from .test_login import FakeLogin

WID = "0123456789abcdef0123456789abcdef"


class _ChannelFile:
    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.channel = self

    def write(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def read(self) -> bytes:
        return self.data

    def recv_exit_status(self) -> int:
        return 0


class _Client:
    """paramiko's SSHClient.exec_command as seen through a link that loses one reply: the server
    received the exec request and ran the command, then the connection broke before the
    channel-success reply arrived (paramiko then raises from Channel._wait_for_event)."""

    def __init__(self, ran: list[str], lose_first_reply: bool) -> None:
        self.ran, self.lose = ran, lose_first_reply

    def exec_command(self, command: str, timeout: float | None = None):
        self.ran.append(command)  # the request reached sshd: the command runs there
        if self.lose:
            from paramiko.ssh_exception import SSHException

            raise SSHException("Channel closed.")
        return _ChannelFile(), _ChannelFile(b"77\n"), _ChannelFile()


class _Connection:
    def __init__(self, client: _Client) -> None:
        self.client = client

    def close(self) -> None:
        pass


class LossyLogin(LoginNode):
    """A LoginNode whose first connection loses the reply to the first exec request."""

    def __init__(self) -> None:
        super().__init__("alice@login1")
        self.ran: list[str] = []
        self.opened = 0

    def _connect(self):  # type: ignore[override]
        if self._connection is None:
            self.opened += 1
            self._connection = _Connection(_Client(self.ran, lose_first_reply=self.opened == 1))
        return self._connection


@pytest.mark.xfail(strict=True, reason="FINDING 2: an exec request whose reply is lost is sent again "
                                       "(LoginNode._exec retries exec_command) -> sbatch submits twice")
def test_a_command_whose_reply_was_lost_is_not_run_a_second_time():
    login = LossyLogin()
    try:  # expected: CommandError (returncode -1: the outcome is unknown), never a second run
        login.call(["sbatch", "--parsable", "--", "/home/alice/job.sh"])
    except CommandError as error:
        assert error.returncode == -1
    assert len(login.ran) == 1, f"sent {len(login.ran)} times: {login.ran}"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


@pytest.fixture
def unreachable_login(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    return LoginNode(f"alice@127.0.0.1:{_closed_port()}", ssh_config=str(config), connect_timeout=2,
                     connect_kwargs={"look_for_keys": False, "allow_agent": False})


@pytest.mark.xfail(strict=True, reason="FINDING 4: an unreachable login node raises LaunchError out of "
                                       "sacct_states/squeue_jobs/scancel (they only catch CommandError)")
@pytest.mark.parametrize("ask", ["sacct", "squeue", "scancel", "final_states", "kill_all"])
def test_an_unreachable_login_node_means_unknown_states_not_an_exception(unreachable_login, ask):
    """A laptop's wifi blip must not make detect_lost_workers / wait_for_workers / stop_workers raise
    (heartbeat-based lost detection and the kill of other workers would be skipped)."""
    run = unreachable_login.call
    handles = [SbatchHandle(WID, "12_0", login=unreachable_login)]
    calls = {"sacct": lambda: sacct_states(["12_0"], run), "squeue": lambda: squeue_jobs(["12_0"], run),
             "scancel": lambda: scancel(["12_0"], run), "final_states": lambda: SbatchHandle.final_states(handles),
             "kill_all": lambda: SbatchHandle.kill_all(handles)}
    calls[ask]()  # expected: {} / a warning, as when sacct itself fails


@pytest.mark.xfail(strict=True, reason="FINDING 6: sbatch exited 0 (job submitted) but printed something else "
                                       "first: maybe_started=False, so the records are forgotten")
def test_sbatch_that_succeeded_with_unparsable_output_may_have_started():
    # e.g. a job_submit plugin / site wrapper / .bashrc that prints a line on stdout before the id
    login = FakeLogin("alice@login1", {"sbatch": "Note: your account has 10 SU left\n77\n"})
    launcher = SbatchLauncher("/logs", login=login)
    with pytest.raises(LaunchError) as raised:
        launcher.start(["w1"], WorkerCommand("net", "python3"))
    assert raised.value.maybe_started


class CountingLogin(LossyLogin):
    def _connect(self):  # type: ignore[override]
        if self._connection is None:
            self.opened += 1
            self._connection = _Connection(_Client(self.ran, lose_first_reply=False))
        return self._connection


@pytest.mark.xfail(strict=True, reason="FINDING 7: LoginNode.close() is not final: a monitor/adapt thread "
                                       "still running after Rush.close() reopens the SSH connection")
def test_a_closed_login_node_does_not_reconnect():
    login = CountingLogin()
    login.call(["true"])
    login.close()
    with pytest.raises((LaunchError, RuntimeError)):  # e.g. "login node closed"
        login.call(["squeue"])
    assert login.opened == 1
