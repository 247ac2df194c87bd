"""The README stays true: every code block and command in it runs here.

Blocks right after an ``<!-- illustration: ... -->`` comment need the user's own hosts or cluster;
the ssh and slurm tests run the same calls against real ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(<!-- illustration:[^>]*-->\n)?```(\w+)\n(.*?)```", re.S)
BLOCKS = [(lang, body, bool(marker)) for marker, lang, body in BLOCK.findall(README)]
PYTHON_BLOCKS = [body for lang, body, illustration in BLOCKS if lang == "python" and not illustration]
COMMANDS = [line[2:] for lang, body, illustration in BLOCKS if lang == "console" and not illustration
            for line in body.splitlines() if line.startswith("$ ")]
BIN = Path(sys.executable).parent


def test_readme_has_the_blocks_we_expect():
    assert len(PYTHON_BLOCKS) >= 3 and any(c.startswith("rush-hpc status") for c in COMMANDS)
    assert "scripts/test" in COMMANDS
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's command


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.strip().splitlines()[0][:40])
def test_python_block_runs(code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_quick_start_command_on_a_machine_without_redis(tmp_path):
    """The one quick-start command, in a fresh copy, with no redis-server on PATH."""
    command = next(c for c in COMMANDS if "demo random-search" in c and "venv" in c)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "bin"  # a PATH with Python and a shell, and no redis-server
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    for tool in ("bash", "sh"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUSH_", "REDIS_"))}
    env["PATH"] = str(bin_dir)
    assert shutil.which("redis-server", path=env["PATH"]) is None
    result = subprocess.run([str(bin_dir / "bash"), "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "* Finished Tasks: 1" in result.stdout and "best y =" in result.stdout


@pytest.fixture
def populated(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys[:1], [{"y": 1}])
    return rush


def test_console_commands_run(populated, redis_config, tmp_path):
    env = {**os.environ, "RUSH_HPC_URL": redis_config.to_url(show_secrets=True),
           "RUSH_HPC_NETWORK": populated.network, "PATH": f"{BIN}:{os.environ['PATH']}"}
    ran = 0
    for command in COMMANDS:
        if "venv" in command or command == "scripts/test":
            continue  # the quick start has its own test; scripts/test is what runs this test
        command = command.replace("redis-cli ", f"redis-cli -p {redis_config.port} ")
        result = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout[-1000:]}\n{result.stderr[-2000:]}"
        ran += 1
    assert ran >= 10
