"""Small controller rules that need no Redis."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from rush_hpc import ConfigError, defaults
from rush_hpc.controller import positive_count
from rush_hpc.launchers.local import controller_pythonpath


@pytest.mark.parametrize("value", [2, np.int64(2), np.int32(2), np.uint8(2)])
def test_any_integral_number_of_workers(value):
    assert positive_count(value) == 2 and type(positive_count(value)) is int


@pytest.mark.parametrize("value", [0, -1, 2.0, "2", None, True, np.float64(2)])
def test_not_a_count(value):
    with pytest.raises(ConfigError, match="n_workers must be a positive integer"):
        positive_count(value)


def test_local_workers_get_the_controllers_import_path_but_not_the_interpreters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path / "missing"), os.path.join(sys.prefix, "lib"), *sys.path])
    entries = controller_pythonpath().split(os.pathsep)
    assert entries[0] == str(tmp_path.resolve())
    assert str(tmp_path / "missing") not in entries
    assert not any(e.startswith(os.path.realpath(sys.prefix) + os.sep) for e in entries)


def test_both_slurm_launchers_share_the_signal_delay():
    import inspect

    from rush_hpc.launchers.sbatch import DEFAULTS
    from rush_hpc.launchers.slurm import SubmititLauncher

    submitit_default = inspect.signature(SubmititLauncher).parameters["signal_delay_s"].default
    assert DEFAULTS["signal_delay_s"] == submitit_default == defaults.SIGNAL_DELAY_S
