"""The micro-batcher: concurrent callers share batches, each gets its own result or error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cmr_search.api.batching import MicroBatcher


def test_concurrent_calls_are_batched_and_answered_in_order():
    sizes, gate = [], threading.Event()

    def double(items):
        gate.wait(5)  # hold the first batch so the others pile up
        sizes.append(len(items))
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=8)
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(batcher, i) for i in range(20)]
        time.sleep(0.2)
        gate.set()
        assert [f.result(5) for f in futures] == [2 * i for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) < 20


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_goes_on():
    def fail_on_three(items):
        if 3 in items:
            raise ValueError("three")
        return items

    batcher = MicroBatcher(fail_on_three)
    with pytest.raises(ValueError, match="three"):
        batcher(3)
    assert batcher(4) == 4
