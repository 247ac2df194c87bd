"""The vignette's examples, run small on real Redis with real local workers."""

from __future__ import annotations

import pytest

from rush_hpc.examples import bayesian_optimization, median_stopping, random_search

pytestmark = pytest.mark.examples


def test_random_search(rush, capsys):
    tasks = random_search.run(rush, n_workers=2, n_tasks=50)
    out = capsys.readouterr().out
    assert len(tasks) >= 50 and tasks["y"].is_monotonic_increasing
    assert "* Finished Tasks:" in out and "best y =" in out


def test_median_stopping_prints_real_results(rush, capsys):
    tasks = median_stopping.run(rush, n_workers=2, n_tasks=60)
    out = capsys.readouterr().out
    assert len(tasks) >= 60 and tasks["rmse"].notna().all()
    assert set(tasks["nrounds"]) <= {5, 10, 15, 20}
    assert (tasks["nrounds"] == 5).sum() >= (tasks["nrounds"] == 20).sum()  # stopping happens
    assert "best rmse =" in out and "evaluations and RMSE per number of rounds" in out


def test_bayesian_optimization(rush, capsys):
    tasks = bayesian_optimization.run(rush, n_workers=2, n_tasks=40, n_initial=10)
    out = capsys.readouterr().out
    assert len(tasks) >= 40 and rush.n_queued_tasks == 0
    assert "best y =" in out and "initial points" in out


def test_missing_example_dependencies_name_the_extra(monkeypatch):
    import importlib.util

    from rush_hpc import ConfigError
    from rush_hpc.examples import require

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs xgboost: pip install 'rush-hpc\[examples\]'"):
        require("xgboost")
