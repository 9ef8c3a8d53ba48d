"""The limits that keep every HTTP input a 4xx naming the problem: JSON depth, definition size and shape, windows,
path and query parameters, secrets compared as bytes. Each case here was a 500 or a silent 201 before (issue 9's
findings); tests/integration/test_http_hardening.py sends the same over HTTP to a real ingest and worker."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.checks import json_depth
from agents.compute.catalog import Catalog, build_catalog, parse_audience
from agents.compute.definitions import MAX_DEFINITION_BYTES, MAX_LIST_ITEMS, parse_trait
from agents.durations import parse_duration_ms
from agents.errors import ConfigError, InvalidMessage
from agents.ingest.tracking import MAX_JSON_DEPTH, batch_to_raw_events, to_raw_event
from topology.config import Settings
from topology.web.common import HttpError, same_secret
from topology.web.worker import hops, limit_param, partition_param


def nested(levels: int, leaf: Any = 1) -> Any:
    """`levels` objects inside each other: {"a": {"a": ... leaf}}."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def track(**fields: Any) -> dict[str, Any]:
    return {"userId": "u1", "event": "Clicked", **fields}


@given(st.recursive(st.integers() | st.text(max_size=3), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)))
def test_json_depth_counts_levels_of_objects_and_arrays(value: Any) -> None:
    def depth(node: Any) -> int:  # the plain recursive definition, as the oracle
        if isinstance(node, dict):
            return 1 + max((depth(v) for v in node.values()), default=0)
        if isinstance(node, list):
            return 1 + max((depth(v) for v in node), default=0)
        return 0

    assert json_depth(value, 100) == depth(value)
    assert json_depth(value, 1) == min(depth(value), 2)


def test_json_depth_walks_100_000_levels_without_recursion() -> None:
    value: Any = []
    for _ in range(100_000):
        value = [value]
    assert json_depth(value, 64) == 65


@pytest.mark.parametrize("levels", [63, 64, 300, 1_000])
def test_a_message_nested_deeper_than_the_limit_is_refused_naming_the_field(levels: int) -> None:
    message = track(properties=nested(levels - 2, {}))  # the message, properties, then levels - 2 more
    if levels <= MAX_JSON_DEPTH:
        assert to_raw_event(message, call_type="track", source="s", received_at=1)["properties"]
        return
    with pytest.raises(InvalidMessage) as info:
        to_raw_event(message, call_type="track", source="s", received_at=1)
    assert info.value.field == "properties" and f"{MAX_JSON_DEPTH} levels" in info.value.reason


def test_a_batch_context_nested_too_deep_is_refused_for_the_whole_batch() -> None:
    events, problems = batch_to_raw_events({"batch": [track()], "context": nested(300)}, source="s", received_at=1)
    assert events == [] and problems and problems[0].index is None and "levels" in problems[0].reason


NEW = Catalog.empty()  # what a POST or the config file adds to


@pytest.mark.parametrize("window", [5, 5.0, True, ["1d"], {"d": 1}, "99999999999d", "3651d", "9" * 1_000 + "d", "0.5s", "soon"])
def test_a_new_window_is_a_duration_string_from_one_second_to_ten_years(window: Any) -> None:
    with pytest.raises(ConfigError, match="window"):
        NEW.with_definition("trait", {"key": "t", "kind": "count", "window": window})
    with pytest.raises(ConfigError, match="within"):
        NEW.with_definition("audience", {"key": "a", "when": {"event": "E", "within": window}})
    with pytest.raises(ConfigError, match="window"):
        Settings.from_mapping({"traits": [{"key": "t", "kind": "count", "window": window}]})


def test_windows_within_the_bounds_are_taken() -> None:
    assert NEW.with_definition("trait", {"key": "t", "kind": "count", "window": "3650d"}).traits["t"].window_ms == 3_650 * 86_400_000
    assert NEW.with_definition("trait", {"key": "t", "kind": "count", "window": "1s"}).traits["t"].window_ms == 1_000


def test_definitions_already_on_the_topic_keep_meaning_what_they_meant() -> None:
    """A number of seconds was a window before this version: stored definitions still read so, unchanged (same
    body, so the same generation: an upgrade recomputes nothing)."""
    assert parse_trait({"key": "t", "kind": "count", "window": 86_400}).window_ms == 86_400_000
    assert parse_audience({"key": "a", "when": {"event": "E", "within": 60}}).key == "a"
    assert parse_trait({"key": "t", "kind": "count", "where": {"property": "p", "in": list(range(5_000))}}).key == "t"


def test_a_duration_too_long_for_a_long_is_a_value_error_not_an_overflow() -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_duration_ms("9" * 400 + "d")


@pytest.mark.parametrize("definition, limit", [
    ({"key": "t", "kind": "count", "where": {"property": "p", "in": list(range(MAX_LIST_ITEMS + 1))}}, "list of 1001 items"),
    ({"key": "t", "kind": "count", "where": {"property": "p", "eq": "x" * MAX_DEFINITION_BYTES}}, "bytes of JSON"),
    ({"key": "t", "kind": "count", "where": {"property": "p", "eq": list(range(40_000))}}, "list of 40000 items"),
    ({"key": "t", "kind": "count", "where": nested(100, {"property": "p", "eq": 1})}, "nests deeper than 64"),
])  # fmt: skip
def test_new_trait_definitions_over_a_limit_are_refused_naming_it(definition: dict[str, Any], limit: str) -> None:
    with pytest.raises(ConfigError, match=limit):
        NEW.with_definition("trait", definition)


def test_an_audience_nested_10_000_levels_is_refused_before_anything_walks_it() -> None:
    when: Any = {"trait": "traits.plan", "exists": True}
    for _ in range(10_000):
        when = {"all": [when]}
    with pytest.raises(ConfigError, match="nests deeper than 64"):
        build_catalog([], [{"key": "deep", "when": when}])


@pytest.mark.parametrize("text, expected", [("0", 0), ("3", 3)])
def test_partition_parameters_name_a_partition_that_exists(text: str, expected: int) -> None:
    assert partition_param(text, 4) == expected


@pytest.mark.parametrize("text", ["abc", "1e3", "0x1", "\x00", "-1", "4", "", " 1", "١", "99999999999999999999", "1" * 5_000])
def test_other_partition_parameters_are_a_400(text: str) -> None:
    with pytest.raises(HttpError) as info:
        partition_param(text, 4)
    assert info.value.status == 400 and "partition" in info.value.body["error"]


class _Request:
    def __init__(self, query: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> None:
        self.query, self.headers = query or {}, headers or {}


@pytest.mark.parametrize("text, expected", [(None, 100), ("1", 1), ("250", 250), ("1000", 1000), ("10000000", 1000), ("9" * 5_000, 1000)])
def test_a_limit_is_a_positive_whole_number_and_large_ones_are_cut(text: str | None, expected: int) -> None:
    assert limit_param(_Request({} if text is None else {"limit": text})) == expected


@pytest.mark.parametrize("text", ["-1", "0", "abc", "1.5", "", "²", "0" * 5_000])
def test_other_limits_are_a_400(text: str) -> None:
    with pytest.raises(HttpError) as info:
        limit_param(_Request({"limit": text}))
    assert info.value.status == 400 and "limit" in info.value.body["error"]


@pytest.mark.parametrize("text", ["abc", "-1", "9", "1e3", "０", "1" * 5_000])
def test_a_hops_header_that_is_no_small_number_is_a_400(text: str) -> None:
    with pytest.raises(HttpError) as info:
        hops(_Request(headers={"X-CDP-Hops": text}))
    assert info.value.status == 400
    assert hops(_Request()) == 0 and hops(_Request(headers={"X-CDP-Hops": "3"})) == 3


def test_secrets_are_compared_as_bytes_whatever_characters_come() -> None:
    assert same_secret("Bearer s3cret", "Bearer s3cret")
    assert not same_secret("Bearer sécret", "Bearer s3cret") and not same_secret("Bearer \udcff", "Bearer s3cret")
    assert same_secret("Bearer ключ", "Bearer ключ")
