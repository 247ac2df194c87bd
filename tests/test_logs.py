"""Worker log records in Redis: the capped list, and following it past the cap by sequence number."""

from __future__ import annotations

import logging
import uuid

import pytest

from rush_hpc.logs import LogFollower, RedisLogHandler, read_log


@pytest.fixture
def log(raw):
    key = f"rush:{{test-{uuid.uuid4().hex[:8]}}}:log"
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = RedisLogHandler(raw, key, "w1", max_records=5)
    logger.addHandler(handler)
    yield key, logger
    logger.removeHandler(handler)
    raw.delete(key, key + ":seq")


def messages(frame):
    return frame["message"].tolist()


def test_the_list_is_capped_and_read_log_returns_the_newest(raw, log):
    key, logger = log
    for i in range(8):
        logger.info("record %d", i)
    assert messages(read_log(raw, key)) == [f"record {i}" for i in range(3, 8)]
    assert messages(read_log(raw, key, n=2)) == ["record 6", "record 7"]
    assert read_log(raw, key, worker_ids=["other"]).empty


def test_follower_keeps_reading_past_the_cap(raw, log):
    key, logger = log
    follower = LogFollower(raw, key)
    assert follower.read().empty
    seen = []
    for i in range(23):  # the cap is 5: the list index stops moving after 5 records
        logger.info("record %d", i)
        if i % 2:
            frame = follower.read()
            seen += messages(frame)
            assert frame["seq"].tolist() == list(range(frame["seq"].iloc[0], follower.last + 1))
    seen += messages(follower.read())
    assert seen == [f"record {i}" for i in range(23)] and follower.dropped == 0
    assert follower.read().empty


def test_follower_counts_records_trimmed_before_it_read_them(raw, log):
    key, logger = log
    follower = LogFollower(raw, key)
    logger.info("first")
    assert messages(follower.read()) == ["first"]
    for i in range(12):
        logger.info("burst %d", i)
    frame = follower.read()
    assert messages(frame) == [f"burst {i}" for i in range(7, 12)]
    assert frame["seq"].tolist() == list(range(9, 14)) and follower.dropped == 7


def test_follower_skips_records_that_are_not_records(raw, log):
    key, logger = log
    raw.rpush(key, b"not json", b"[1, 2]", b'{"time": "x"}')
    raw.incrby(key + ":seq", 3)
    logger.warning("real one")
    frame = LogFollower(raw, key).read()
    assert messages(frame) == ["real one"] and frame["level"].tolist() == ["WARNING"]


def test_after_a_reset_the_follower_starts_again(raw, log):
    key, logger = log
    follower = LogFollower(raw, key)
    for i in range(3):
        logger.info("before %d", i)
    assert len(follower.read()) == 3
    raw.delete(key, key + ":seq")
    logger.info("after")
    assert messages(follower.read()) == ["after"]
