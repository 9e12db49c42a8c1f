"""The one exactly-once filter the learner and the per-key router share."""

from __future__ import annotations

from stream_cl.learn.offsets import OffsetTracker


def test_an_offset_is_taken_in_once_per_partition_and_a_reset_or_resume_moves_the_mark() -> None:
    t = OffsetTracker({1: 5})
    assert [t.take(1, o) for o in (3, 5, 5, 7, 6)] == [False, True, False, True, False]
    assert t.take(0, 0) and not t.take(0, 0)  # a partition never seen starts at 0
    assert t.next_offsets() == {0: 1, 1: 8} and t.next_offset(2) == 0 and 1 in t
    t.resume(1, 2)  # a takeover: from the manifest's offset on, whatever was taken in before
    assert t.take(1, 2)
    t.forget(0)
    assert 0 not in t and sorted(t) == [1] and t.partitions() == {1}
    t.reset({3: 10})
    assert t.next_offsets() == {3: 10} and not t.take(3, 9) and t.take(3, 10)
