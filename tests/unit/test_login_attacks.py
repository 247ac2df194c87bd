"""Review of issue 16's login-node submission (commit 7691148): attacks on the logic that need no SSH
server (a fake connection at fabric's boundary, or a real LoginNode pointed at a closed loopback port).

Each test showed a defect of the reviewed code (FINDING n in the review); all are fixed.
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


class _File:
    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


class _Channel:
    """paramiko's session channel as seen through a link that may lose one reply: the server
    received the exec request and ran the command, then the connection broke before the
    channel-success reply arrived (paramiko then raises from Channel._wait_for_event)."""

    def __init__(self, ran: list[str], lose_reply: bool) -> None:
        import threading

        self.ran, self.lose = ran, lose_reply
        self.status_event = threading.Event()

    def settimeout(self, timeout) -> None:
        pass

    def exec_command(self, command: str) -> None:
        self.ran.append(command)  # the request reached sshd: the command runs there
        if self.lose:
            from paramiko.ssh_exception import SSHException

            raise SSHException("Channel closed.")
        self.status_event.set()

    def sendall(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def makefile(self, mode: str) -> _File:
        return _File(b"77\n")

    def makefile_stderr(self, mode: str) -> _File:
        return _File()

    def recv_exit_status(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _Transport:
    def __init__(self, ran: list[str], lose_first_reply: bool) -> None:
        self.ran, self.lose = ran, lose_first_reply

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout=None) -> _Channel:
        channel = _Channel(self.ran, self.lose)
        self.lose = False
        return channel


class _Client:
    def __init__(self, ran: list[str], lose_first_reply: bool) -> None:
        self.transport = _Transport(ran, lose_first_reply)

    def get_transport(self) -> _Transport:
        return self.transport


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


def test_sbatch_that_printed_a_line_before_the_job_id_is_understood():
    # e.g. a job_submit plugin / site wrapper / .bashrc that prints a line on stdout before the id
    login = FakeLogin("alice@login1", {"sbatch": "Note: your account has 10 SU left\n77\n"})
    launcher = SbatchLauncher("/logs", login=login)
    [handle] = launcher.start(["w1"], WorkerCommand("net", "python3"))
    assert handle.job_id == "77_0"


class CountingLogin(LossyLogin):
    def _connect(self):  # type: ignore[override]
        if self._connection is None:
            self.opened += 1
            self._connection = _Connection(_Client(self.ran, lose_first_reply=False))
        return self._connection


def test_a_closed_login_node_does_not_reconnect():
    login = CountingLogin()
    login.call(["true"])
    login.close()
    with pytest.raises((LaunchError, RuntimeError)):  # e.g. "login node closed"
        login.call(["squeue"])
    assert login.opened == 1
