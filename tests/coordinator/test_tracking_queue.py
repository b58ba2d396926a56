"""The on-disk tracking queue: idempotent enqueue, replay order, one replayer at a time, and a
fast, harmless failure while MLflow is unreachable."""

from __future__ import annotations

import time

from coordinator.tracking.queue import OpQueue
from coordinator.tracking.tracker import Tracker
from demo.processes import free_port


def test_enqueue_is_idempotent_and_keeps_order(tmp_path):
    queue = OpQueue(tmp_path)
    assert queue.enqueue("expert:1", "expert_run", {"n": 1})
    assert queue.enqueue("version:a", "router_version", {"n": 2})
    assert not queue.enqueue("expert:1", "expert_run", {"n": 99})  # same call again
    assert [(op.op_id, op.payload["n"]) for op in queue.pending()] == [
        ("expert:1", 1), ("version:a", 2)]
    queue.mark_done(queue.pending()[0])
    assert [op.op_id for op in OpQueue(tmp_path).pending()] == ["version:a"]  # survives reopen
    assert not queue.enqueue("expert:1", "expert_run", {"n": 1})  # done calls are not redone
    assert queue.counts() == {"pending": 1, "done": 1, "failed": 0}


def test_only_one_replayer_at_a_time(tmp_path):
    queue = OpQueue(tmp_path)
    with queue.replay_lock() as first:
        with OpQueue(tmp_path).replay_lock() as second:
            assert first and not second
    with queue.replay_lock() as again:
        assert again


def test_unreachable_mlflow_keeps_calls_queued_and_fails_fast(tmp_path):
    tracker = Tracker(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    tracker.record_promotion("0123456789abcdef", 1)
    started = time.perf_counter()
    result = tracker.replay()
    assert result.pending == 1 and result.replayed == 0 and result.error
    assert time.perf_counter() - started < 20  # no minutes of HTTP retries
    assert tracker.queue.counts() == {"pending": 1, "done": 0, "failed": 0}
