"""`EpochStream`: every epoch's batches read ahead by one thread, passes kept whole."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.images.ingest import EpochStream
from pipelines.images.quality import BadDataError


def passes_of(lengths: dict[int, int], opened: list, fail_at: tuple[int, int] | None = None):
    """`open_pass` over epochs whose passes hold `lengths[epoch]` batches named (epoch, index)."""
    def open_pass(epoch):
        opened.append((epoch, time.perf_counter()))
        for index in range(lengths[epoch]):
            if (epoch, index) == fail_at:
                raise BadDataError(f"train: bad data in epoch {epoch}")
            yield (epoch, index)
    return open_pass


def test_each_epoch_gets_its_own_pass_whole_and_in_order():
    opened = []
    stream = EpochStream(passes_of({3: 4, 4: 2, 5: 3}, opened), range(3, 6), depth=2)
    try:
        assert [list(stream.next_pass()) for _ in range(3)] == [
            [(3, i) for i in range(4)], [(4, 0), (4, 1)], [(5, i) for i in range(3)]]
    finally:
        stream.close()
    assert [epoch for epoch, _ in opened] == [3, 4, 5]  # no pass beyond the last epoch


def test_an_epoch_that_ends_before_its_pass_drops_the_rest_not_the_next_pass():
    stream = EpochStream(passes_of({0: 5, 1: 5}, []), range(2), depth=3)
    try:
        first = stream.next_pass()
        assert [next(first), next(first)] == [(0, 0), (0, 1)]  # the loop's epoch ends here
        assert list(stream.next_pass()) == [(1, i) for i in range(5)]
    finally:
        stream.close()


def test_the_next_pass_opens_while_the_loop_still_trains_on_queued_batches():
    opened = []
    stream = EpochStream(passes_of({0: 3, 1: 3}, opened), range(2), depth=4)
    try:
        batches = stream.next_pass()
        assert next(batches) == (0, 0)
        deadline = time.perf_counter() + 10
        while len(opened) < 2 and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert [epoch for epoch, _ in opened] == [0, 1], "epoch 1's pass waited for the loop"
        assert list(batches) == [(0, 1), (0, 2)]
    finally:
        stream.close()


def test_an_error_in_a_pass_reaches_the_loop_where_it_asks_for_a_batch():
    stream = EpochStream(passes_of({0: 4, 1: 4}, [], fail_at=(0, 2)), range(2), depth=2)
    try:
        batches = stream.next_pass()
        assert [next(batches), next(batches)] == [(0, 0), (0, 1)]
        with pytest.raises(BadDataError, match="bad data in epoch 0"):
            next(batches)
    finally:
        stream.close()


def test_close_ends_a_reader_that_waits_on_a_full_queue():
    stream = EpochStream(passes_of({0: 100}, []), range(1), depth=1)
    time.sleep(0.2)
    stream.close()
    deadline = time.perf_counter() + 5
    while any(t.name == "selfsup-epochs" and t.is_alive() for t in threading.enumerate()):
        assert time.perf_counter() < deadline, "the reader thread did not stop"
        time.sleep(0.05)

