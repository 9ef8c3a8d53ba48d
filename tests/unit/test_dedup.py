"""messageId dedup decisions, checked against declarative properties rather than a copy of the algorithm."""

from __future__ import annotations

from itertools import accumulate

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.ingest.dedup import first_sightings

WINDOW = 1_000


def event(message_id: str, received_at: int) -> dict:
    return {"message_id": message_id, "received_at": received_at}


calls = st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 5_000)), max_size=60)


def stream_times(items: list[tuple[str, int]]) -> list[int]:
    """The oracle's clock: the running maximum of received_at."""
    return list(accumulate((t for _, t in items), max))


def passed_flags(items: list[tuple[str, int]], cuts: list[int] = ()) -> list[bool]:
    """Which inputs pass, processing in batches split at `cuts`, remembering each batch only after it, as the stage does."""
    seen: dict[str, int] = {}
    stream_time = 0
    flags: list[bool] = []
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    for start, end in zip(bounds, bounds[1:]):
        batch = [event(m, t) for m, t in items[start:end]]
        out = first_sightings(batch, seen, WINDOW, stream_time)
        kept = {index for index, _ in out.passed}
        flags.extend(index in kept for index in range(len(batch)))
        seen.update(out.remember)
        stream_time = out.stream_time
    return flags


@settings(max_examples=400)
@given(calls)
def test_no_two_passed_sightings_of_one_message_id_fall_within_the_window(items: list[tuple[str, int]]) -> None:
    times = stream_times(items)
    passed = [(m, t) for (m, _), t, ok in zip(items, times, passed_flags(items)) if ok]
    for i, (m, t) in enumerate(passed):
        assert all(t - t0 >= WINDOW for m0, t0 in passed[:i] if m0 == m)


@settings(max_examples=400)
@given(calls)
def test_every_dropped_call_repeats_a_passed_sighting_within_the_window(items: list[tuple[str, int]]) -> None:
    times = stream_times(items)
    flags = passed_flags(items)
    for i, ((m, _), t, ok) in enumerate(zip(items, times, flags)):
        if not ok:
            assert any(items[j][0] == m and flags[j] and t - times[j] < WINDOW for j in range(i))


@settings(max_examples=400)
@given(calls, st.lists(st.integers(0, 100), max_size=8))
def test_batching_does_not_change_the_decisions(items: list[tuple[str, int]], cuts: list[int]) -> None:
    assert passed_flags(items, cuts) == passed_flags(items)


def test_a_message_id_seen_again_after_the_window_passes_again() -> None:
    out = first_sightings([event("m", 0), event("m", 999), event("m", 1_000)], {}, WINDOW, 0)
    assert [t for _, t in out.passed] == [0, 1_000]
    assert out.remember == {"m": 1_000} and out.stream_time == 1_000


def test_a_remembered_sighting_drops_the_repeat_and_clocks_never_step_back() -> None:
    out = first_sightings([event("m", 500), event("n", 400)], {"m": 100}, WINDOW, 450)
    assert out.passed == [(1, 500)]
    assert out.remember == {"n": 500}
