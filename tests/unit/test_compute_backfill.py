"""A compute partition's backfill bookkeeping (agents/compute/backfill.py), on plain records: which generations
it has met, and each run's way through its two phases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.compute.backfill import DONE_KEPT, Backfills, DefinitionsBehind

GENS = {"trait:orders@0": ("orders@0",), "audience:buyers@0": ("orders@0", "revenue@0"), "trait:plan@1": ("plan@1",)}


def sids(generations: dict[str, tuple[str, ...]]) -> set[str]:
    return {sid for group in generations.values() for sid in group}


def test_a_generation_met_once_gets_one_run_reading_up_to_the_live_position() -> None:
    backfills = Backfills(None)
    assert backfills.meet(GENS, sids(GENS), position=3, until=120, now=1) is True
    runs = {run["gen"]: run for run in backfills.runs}
    assert set(runs) == set(GENS)
    assert runs["audience:buyers@0"]["sids"] == ["revenue@0"], "a state id another run computes is not counted twice"
    assert all(run["phase"] == "events" and run["until"] == 120 and run["next"] is None for run in runs.values())
    assert backfills.reading() == {"orders@0", "revenue@0", "plan@1"}
    assert backfills.meet(GENS, sids(GENS), position=3, until=500, now=2) is None
    assert backfills.meet(GENS, sids(GENS), position=4, until=500, now=2) is False and backfills.record["feed"] == 4
    with pytest.raises(DefinitionsBehind):
        backfills.meet(GENS, sids(GENS), position=2, until=500, now=3)


def test_an_empty_partition_settles_at_once() -> None:
    backfills = Backfills(None)
    backfills.meet(GENS, sids(GENS), position=1, until=0, now=1)
    assert {run["phase"] for run in backfills.runs} == {"settle"} and backfills.reading() == frozenset()


def test_a_run_reads_its_history_in_chunks_then_settles_every_profile_and_is_kept_done() -> None:
    backfills = Backfills(None)
    backfills.meet({"trait:orders@0": ("orders@0",)}, {"orders@0"}, position=1, until=250, now=1)
    run = backfills.run("trait:orders@0")
    assert run is not None
    backfills.events_read(run, start=0, reached=100, read=100, counted=90)
    assert run["phase"] == "events" and run["next"] == 100 and run["from"] == 0
    backfills.events_read(run, start=100, reached=250, read=150, counted=150)
    assert run["phase"] == "settle" and run["from"] == 0 and (run["read"], run["counted"]) == (250, 240)
    assert backfills.settled(run, ["p1", "p2"], chunk=2, now=5) is False and run["after"] == "p2"
    assert backfills.settled(run, ["p3"], chunk=2, now=6) is True
    assert backfills.runs == [] and backfills.done[-1]["finished"] == 6 and backfills.done[-1]["settled"] == 3


def test_finished_runs_kept_are_bounded() -> None:
    backfills = Backfills(None)
    for n in range(DONE_KEPT + 7):
        gen = f"trait:t{n}@0"
        backfills.meet({gen: (f"t{n}@0",)}, {f"t{n}@0"}, position=n + 1, until=0, now=n)
        backfills.settled(backfills.run(gen), [], chunk=10, now=n)  # type: ignore[arg-type]
    assert len(backfills.done) == DONE_KEPT and backfills.done[-1]["gen"] == f"trait:t{DONE_KEPT + 6}@0"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sets(st.sampled_from(sorted(GENS))), min_size=1, max_size=12))
def test_a_generation_is_backfilled_each_time_it_comes_back_and_never_while_it_stays(live_sets: list[set[str]]) -> None:
    """Oracle: a run starts for a generation when it is live and was not live at the previous step; a state id is
    counted by at most one run at a time; nothing is left for a generation no longer live."""
    backfills, before = Backfills(None), set()
    for position, names in enumerate(live_sets, start=1):
        generations = {name: GENS[name] for name in sorted(names)}
        starts_before = [run["gen"] for run in backfills.runs]
        backfills.meet(generations, sids(generations), position=position, until=10, now=position)
        started = [run["gen"] for run in backfills.runs if run["started"] == position]
        assert sorted(started) == sorted(names - before), (before, names)
        assert {run["gen"] for run in backfills.runs} <= names
        assert set(starts_before) & names <= {run["gen"] for run in backfills.runs}, "a live run is never dropped"
        counted = [sid for run in backfills.runs for sid in run["sids"]]
        assert len(counted) == len(set(counted))
        before = names
