"""The in-process launcher (debugging): the loop runs in the controller's thread, same API and states,
the same frames as local workers, and an exception propagates with its traceback."""

from __future__ import annotations

import pytest

from conftest import wait_until
from loops import FAST, wl_raises, wl_random_search


def test_inline_workers_give_the_frames_local_workers_give(rush, redis_config, network):
    import rush_hpc

    ids = rush.start_local_workers(wl_random_search, n_workers=2, in_process=True, **FAST)
    inline = rush.fetch_finished_tasks()
    assert set(rush.worker_info["state"]) == {"terminated"} and set(rush.worker_info["launcher"]) == {"inline"}
    assert len(inline) == 100 and set(inline["worker_id"]) == {ids[0]}  # the first one did all the work

    other = rush_hpc.rsh(network=network + "-local", config=redis_config, secret=rush.codec.secret)
    try:
        local_ids = other.start_local_workers(wl_random_search, n_workers=2, **FAST)
        other.wait_for_workers(worker_ids=local_ids, timeout=60)
        wait_until(lambda: set(other.worker_ids(state="terminated")) == set(local_ids), 60, what="the loops to end")
        local = other.fetch_finished_tasks()
        assert list(local.columns) == list(inline.columns)
        assert dict(local.dtypes) == dict(inline.dtypes)
        assert len(local) >= 100
    finally:
        other.reset()
        other.close()


def test_an_inline_worker_that_raises_shows_the_traceback(rush):
    with pytest.raises(ValueError, match="objective exploded"):
        rush.start_local_workers(wl_raises, in_process=True, **FAST)
    info = rush.worker_info.iloc[0]
    assert info["state"] == "failed" and "objective exploded" in info["reason"]
    assert rush.n_running_tasks == 0 and rush.n_failed_tasks == 1
