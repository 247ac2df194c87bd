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
    tasks = bayesian_optimization.run(rush, n_workers=2, n_tasks=40, n_initial=10, seed=3)
    out = capsys.readouterr().out
    assert len(tasks) >= 40 and rush.n_queued_tasks == 0
    assert "best y =" in out and "initial points" in out
    initial = rush.fetch_tasks()["y"].head(10)  # creation order: the queued design comes first
    assert tasks["y"].min() < initial.min()  # the surrogate found better points than the design
    assert tasks["x1"].between(-5, 10).all() and tasks["x2"].between(0, 15).all()
    assert max(len(line) for line in out.splitlines()) <= 80  # short ids


def test_latin_hypercube_puts_one_point_in_every_slice():
    import random

    points = bayesian_optimization.latin_hypercube(25, random.Random(1))
    assert sorted(int((p["x1"] + 5) / 15 * 25) for p in points) == list(range(25))
    assert sorted(int(p["x2"] / 15 * 25) for p in points) == list(range(25))
    assert points == bayesian_optimization.latin_hypercube(25, random.Random(1))


def test_examples_print_short_ids(rush, capsys):
    random_search.run(rush, n_workers=1, n_tasks=5)
    out = capsys.readouterr().out
    assert rush.worker_ids[0][:8] in out and rush.worker_ids[0] not in out


def test_missing_example_dependencies_name_the_extra(monkeypatch):
    import importlib.util

    from rush_hpc import ConfigError
    from rush_hpc.examples import require

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs xgboost: pip install 'rush-hpc\[examples\]'"):
        require("xgboost")
