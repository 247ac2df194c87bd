"""The wheel ships what users need: templates, the mtcars data, py.typed, the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("rush_hpc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("rush_hpc/templates/sbatch.sh", "rush_hpc/examples/mtcars.csv", "rush_hpc/py.typed",
                     "rush_hpc/launchers/ssh.py", "rush_hpc/examples/median_stopping.py"):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rush-hpc = rush_hpc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (ROOT / "rush_hpc" / "templates" / "sbatch.sh").read_bytes() == zipfile.ZipFile(wheel).read("rush_hpc/templates/sbatch.sh")
