"""One loop per start call: two controllers (or two start calls) on one network with different loops;
each worker runs the loop of its own start call."""

from __future__ import annotations

import rush_hpc

from conftest import SECRET, wait_until
from loops import FAST


def wl_tag_a(rush):
    for _ in range(20):
        rush.push_results(rush.push_running_tasks([{"x": 1}]), [{"loop": "a"}])


def wl_tag_b(rush):
    for _ in range(20):
        rush.push_results(rush.push_running_tasks([{"x": 2}]), [{"loop": "b"}])


def test_two_controllers_on_one_network_each_run_their_own_loop(rush, redis_config, network):
    other = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    try:
        a = rush.start_local_workers(wl_tag_a, n_workers=2, **FAST)
        b = other.start_local_workers(wl_tag_b, n_workers=2, **FAST)  # stored while a's workers start
        rush.wait_for_workers(worker_ids=a + b, timeout=60)
        wait_until(lambda: set(rush.worker_ids(state="terminated")) >= set(a + b), 60, what="the loops to end")
        frame = rush.fetch_finished_tasks()
        by_worker = frame.groupby("worker_id")["loop"].agg(set).to_dict()
        assert {w: by_worker[w] for w in a} == {w: {"a"} for w in a}
        assert {w: by_worker[w] for w in b} == {w: {"b"} for w in b}
        assert len(frame) == 80
    finally:
        other.close()


def test_the_same_loop_started_again_stores_no_new_payload(rush, raw):
    rush.store_worker_loop(wl_tag_a, **FAST)
    rush.store_worker_loop(wl_tag_a, **FAST)
    rush.store_worker_loop(wl_tag_b, **FAST)
    assert raw.scard(rush.keys.payload_batches) == 2
