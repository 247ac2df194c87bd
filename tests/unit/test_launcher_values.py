"""Launcher values that would inject lines into a job script or remote shell are refused with
the option named; names must match strict patterns."""

from __future__ import annotations

import pytest

from rush_hpc import ConfigError
from rush_hpc.launchers.sbatch import SbatchLauncher
from rush_hpc.launchers.slurm import SubmititLauncher
from rush_hpc.launchers.ssh import SSHLauncher, parse_host


@pytest.mark.parametrize("option, value", [
    ("partition", "debug\n#SBATCH --uid=0"), ("job_name", "x\rid"), ("account", "a\0b"), ("qos", "q\n"),
    ("mem", "4G\nrm -rf ~"), ("time", "10\n"), ("python", "/usr/bin/python\nid"), ("template", "/x\n"),
])
def test_sbatch_values_with_line_breaks(option, value):
    with pytest.raises(ConfigError, match=option):
        SbatchLauncher("/tmp/logs", **{option: value})


def test_sbatch_log_dir_and_setup():
    with pytest.raises(ConfigError, match="log_dir"):
        SbatchLauncher("/tmp/logs\n#SBATCH --uid=0")
    with pytest.raises(ConfigError, match="setup"):
        SbatchLauncher("/tmp/logs", setup=["module load x\0; id"])
    with pytest.raises(ConfigError, match="setup must be a list"):
        SbatchLauncher("/tmp/logs", setup="module load x")
    SbatchLauncher("/tmp/logs", setup=["if true; then\n  echo ok\nfi"])  # several lines are fine


@pytest.mark.parametrize("name", ["constraint\n#SBATCH --uid", "Foo", "a b", "a;b", "-x", "", "1x", "x=y"])
def test_extra_directive_names(name):
    with pytest.raises(ConfigError, match="extra_directives"):
        SbatchLauncher("/tmp/logs", extra_directives={name: "v"})


def test_extra_directive_values_and_good_names():
    with pytest.raises(ConfigError, match="extra_directives"):
        SbatchLauncher("/tmp/logs", extra_directives={"constraint": "a\nb"})
    SbatchLauncher("/tmp/logs", extra_directives={"constraint": "a'; echo foo", "gres_flags": "x", "exclusive": True})


@pytest.mark.parametrize("kwargs, option", [
    ({"partition": "p\nx"}, "partition"), ({"account": "a\r"}, "account"), ({"job_name": "j\n"}, "job_name"),
    ({"additional_parameters": {"export\nx": "ALL"}}, "additional_parameters"),
    ({"additional_parameters": {"Export": "ALL"}}, "additional_parameters"),
    ({"additional_parameters": {"export": "ALL\n#SBATCH --uid=0"}}, "additional_parameters"),
    ({"setup": ["echo\0"]}, "setup"), ({"python": "/p\n"}, "python"), ({"comment": "c\nx"}, "comment"),
])
def test_submitit_values(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SubmititLauncher("/tmp/logs", **kwargs)


def test_submitit_setup_runs_under_set_e_and_python_is_quoted():
    launcher = SubmititLauncher("/tmp/logs", setup=["module load x"], python="/opt/my env/bin/python",
                                additional_parameters={"export": "ALL"})
    assert launcher.parameters["setup"] == ["set -e", "module load x"]
    executor = launcher.executor(2)
    assert executor.python == "'/opt/my env/bin/python'"


@pytest.mark.parametrize("env", [{"A B": "x"}, {"1X": "x"}, {"X;id": "x"}, {"": "x"}, {"X\nY": "x"}])
def test_ssh_env_names(env):
    with pytest.raises(ConfigError, match="env"):
        SSHLauncher(["node"], network="n", credentials=b"", env=env)


def test_ssh_values():
    with pytest.raises(ConfigError, match="env"):
        SSHLauncher(["node"], network="n", credentials=b"", env={"OK": "a\0b"})
    with pytest.raises(ConfigError, match="log_dir"):
        SSHLauncher(["node"], network="n", credentials=b"", log_dir="~/x\nid")
    with pytest.raises(ConfigError, match="host"):
        SSHLauncher(["node\nid"], network="n", credentials=b"")
    with pytest.raises(ConfigError, match="setup"):
        SSHLauncher(["node"], network="n", credentials=b"", setup=["a\0"])
    SSHLauncher(["node"], network="n", credentials=b"", env={"NASTY": "a'; id\n$(x)"})  # values are quoted


@pytest.mark.parametrize("spec, expected", [
    ("node", ("node", None, None, 1)),
    ("alice@node", ("node", "alice", None, 1)),
    ("alice@node:2222", ("node", "alice", 2222, 1)),
    ({"host": "bob@n2:22", "n_workers": 4}, ("n2", "bob", 22, 4)),
    ("10.0.0.1:2200", ("10.0.0.1", None, 2200, 1)),
])
def test_host_parsing(spec, expected):
    host = parse_host(spec, {"n_workers": 1, "python": "/usr/bin/python3"})
    assert (host.host, host.user, host.port, host.n_workers) == expected


@pytest.mark.parametrize("spec, message", [
    (42, "a host must be"), ({"user": "x"}, "a host must be"), ({"host": "n", "cores": 2}, "unknown host option"),
    ({"host": "n", "python": "python3.11"}, "must be an absolute path"), ("node:port", "invalid literal"),
])
def test_bad_hosts(spec, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        parse_host(spec, {"python": "/usr/bin/python3"})


def test_the_one_worker_command_is_quoted():
    from rush_hpc.launchers.base import WorkerCommand

    command = WorkerCommand("net", "/opt/my env/bin/python", {"RUSH_HPC_CREDENTIALS": "/a b/c'd.json"})
    assert command.argv("w1") == ["/opt/my env/bin/python", "-m", "rush_hpc", "worker", "--network", "net",
                                  "--worker-id", "w1"]
    assert command.shell("w1") == ("RUSH_HPC_CREDENTIALS='/a b/c'\"'\"'d.json' '/opt/my env/bin/python' -m rush_hpc "
                                   "worker --network net --worker-id w1")
    assert command.export_lines() == ["export RUSH_HPC_CREDENTIALS='/a b/c'\"'\"'d.json'"]


@pytest.mark.parametrize("path, quoted", [("~", "~"), ("~/logs dir", "~/'logs dir'"), ("/abs/x", "/abs/x"),
                                          ("/a b", "'/a b'"), ("~user/x", "'~user/x'")])
def test_remote_paths_keep_the_home_expandable(path, quoted):
    from rush_hpc.launchers.ssh import _remote_path

    assert _remote_path(path) == quoted
