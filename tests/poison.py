"""Poison: what a careless or hostile writer can put on each topic a stage reads, as bytes.

`poison(schema)` draws records of a topic whose values have Avro schema `schema`: random bytes (sometimes behind a
valid single-object header), valid records cut short, null values, valid Avro whose content means nothing a
stage can act on (drawn from the schema itself: tests/avro_strategies.py), and hand-made shapes of wrong meaning
(`HAND_MADE[schema]`: non-object JSON fields, missing or empty ids, times at ±2^62, a profile merged into
itself or into a younger one, commands missing a field their kind needs, ...).

The tests drive a stage with these through its own decode step, so they stay meaningful whatever the stage's
internal formats become: they only say "these bytes arrived on that topic", never how a stage reads them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from tests.avro_strategies import strategy_for
from topology.codecs import AvroCodec, SchemaRepository

REPOSITORY = SchemaRepository.load()
CODECS = {name: AvroCodec(name, REPOSITORY) for name in REPOSITORY.names()}
FAR = 2**62
T0 = 1_700_000_000_000


def encode(schema: str, value: dict[str, Any]) -> bytes:
    return CODECS[schema].encode(value)


def raw_event(message_id: str = "m-poison", **fields: Any) -> dict[str, Any]:
    """A valid RawEvent (track), with `fields` replaced."""
    return {"message_id": message_id, "type": "track", "source": "test", "user_id": None, "anonymous_id": "anon-poison",
            "event": "Clicked", "name": None, "category": None, "group_id": None, "previous_id": None, "properties": {},
            "traits": {}, "context": {}, "integrations": {}, "timestamp": T0, "original_timestamp": None,
            "sent_at": None, "received_at": T0, "extra": {}, **fields}  # fmt: skip


def _wrong_raw_events() -> list[dict[str, Any]]:
    """Valid Avro, wrong meaning: JSON fields that are not objects, an empty messageId, times at the ends."""
    shapes: list[dict[str, Any]] = [raw_event(message_id="")]
    for field in ("properties", "traits", "context", "integrations", "extra"):
        shapes += [raw_event(**{field: "a string"}), raw_event(**{field: [1, 2]}), raw_event(**{field: None}), raw_event(**{field: 7})]
    shapes += [raw_event(timestamp=FAR), raw_event(timestamp=-FAR), raw_event(received_at=FAR), raw_event(received_at=-FAR),
               raw_event(user_id=None, anonymous_id=None),  # no ids at all
               raw_event(context={"externalIds": "not a list", "device": "not an object", "traits": [1]})]  # fmt: skip
    return shapes


def _commands(kind_field: str, templates: dict[str, dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each template with one field dropped, one set to a wrong type, and the extra shapes, as command records."""
    bodies: list[Any] = list(extra)
    for kind, template in templates.items():
        for field in template:
            dropped = {k: v for k, v in template.items() if k != field}
            wrong = {**template, field: {"wrong": [field]} if not isinstance(template[field], dict) else "wrong"}
            bodies += [{"kind": kind, **dropped}, {"kind": kind, **wrong}]
    bodies += [{"kind": "batch", "commands": "not a list"}, {"kind": "batch", "commands": [1, None, {"kind": "nope"}]},
               {"kind": "no such kind"}, {}]  # fmt: skip
    return [{kind_field: str(body.get("kind", "")) if isinstance(body, dict) else "", "body": body} for body in bodies]


X = "p-999999999999999-ffffffffffffffff"  # profile ids of nobody: hand-made commands must not touch real profiles
Y = "p-999999999999999-fffffffffffffffe"
_IDENTITY_TEMPLATES: dict[str, dict[str, Any]] = {
    "claim": {"message_id": "m-x", "index": 0, "type": "user_id", "value": "nobody-x", "candidate": X},
    "claimed": {"message_id": "m-x", "index": 0, "holder": X, "fresh": True},
    "create": {"message_id": "m-x", "profile": X, "at": 1, "ids": [["user_id", "nobody-x", 1]]},
    "join": {"message_id": "m-x", "request": "m-x#1", "a": X, "b": Y, "at": 1, "link": [["user_id", "nobody-x"]]},
    "offer": {"message_id": "m-x", "request": "m-x#1", "a": X, "b": Y, "at": 1, "link": [], "young": X, "old": Y,
              "summary": {"ids": [], "merges": 0, "merged_from": [], "log": []}},
    "offered": {"message_id": "m-x", "request": "m-x#1", "young": X, "accepted": False, "root": Y, "rule": "r", "entry": {}},
    "joined": {"message_id": "m-x", "request": "m-x#1", "accepted": True, "root": Y, "rule": "r"},
    "repoint": {"type": "user_id", "value": "nobody-x", "profile": Y},
}  # fmt: skip
_IDENTITY_ODDITIES: list[dict[str, Any]] = [
    {**_IDENTITY_TEMPLATES["join"], "kind": "join", "a": X, "b": X},  # a profile joined with itself
    {**_IDENTITY_TEMPLATES["offer"], "kind": "offer", "young": Y, "old": X},  # decided at the younger profile
    {**_IDENTITY_TEMPLATES["offer"], "kind": "offer", "young": X, "old": X},
    {**_IDENTITY_TEMPLATES["offered"], "kind": "offered", "accepted": True, "root": X},  # merged into itself
    {**_IDENTITY_TEMPLATES["claimed"], "kind": "claimed", "index": -1},
    {**_IDENTITY_TEMPLATES["claimed"], "kind": "claimed", "index": 10**9},
    {**_IDENTITY_TEMPLATES["create"], "kind": "create", "ids": [["user_id"]], "at": FAR},
    {"kind": "event", "event": raw_event(context="not an object")},
]

_COMPUTE_TEMPLATES: dict[str, dict[str, Any]] = {
    "event": {"profile": X, "event": raw_event(), "sids": ["count@0"], "feed": 0},
    "backfill_event": {"profile": X, "event": raw_event(), "sids": ["count@0"], "feed": 0},
    "fold_out": {"profile": X, "into": Y, "at": 1, "feed": 0},
    "fold_in": {"profile": Y, "from": X, "record": None, "at": 1, "feed": 0},
}


def compute_oddities(profiles: list[str]) -> list[dict[str, Any]]:
    """Commands that name real profiles in ways no stage writes: must be refused, never folded or looped."""
    first, last = min(profiles), max(profiles)
    return [
        {"kind": "fold_out", "profile": first, "into": last, "at": 1},  # into a younger profile: a cycle in the making
        {"kind": "fold_out", "profile": first, "into": first, "at": 1},  # into itself
        {"kind": "fold_in", "profile": last, "from": first, "record": None, "at": 1},
        {"kind": "fold_in", "profile": first, "from": last, "record": {"t": {"x@0": "garbage"}, "i": {}, "m": {}}, "at": 1},
        {"kind": "fold_in", "profile": first, "from": last, "record": {"t": [], "i": 5, "m": None}, "at": 1},
        {"kind": "event", "profile": first, "event": raw_event(), "sids": [], "feed": 10**12},  # definitions never read
        {"kind": "event", "profile": first, "event": raw_event(context=[]), "sids": []},
    ]


def merge_oddities(profiles: list[str]) -> list[dict[str, Any]]:
    """Merge-log entries no identity writes: a profile merged into itself, into a younger one, into nobody."""
    first, last = min(profiles), max(profiles)
    entry = {"kind": "merged", "identifiers": [], "message_id": "m-x", "timestamp": T0, "rule": "r"}
    return [
        {**entry, "survivor_profile_id": last, "merged_profile_id": first},
        {**entry, "survivor_profile_id": first, "merged_profile_id": first},
        {**entry, "survivor_profile_id": first, "merged_profile_id": None},
        {**entry, "survivor_profile_id": first, "merged_profile_id": ""},
        {**entry, "survivor_profile_id": "", "merged_profile_id": last},
    ]


def resolved_oddities(profiles: list[str]) -> list[dict[str, Any]]:
    shapes = [{"profile_id": "", "identifiers": [], "event": raw_event(message_id="m-empty-profile")}]
    shapes += [{"profile_id": profiles[0], "identifiers": [], "event": event} for event in _wrong_raw_events()
               if event["timestamp"] == T0 and event["received_at"] == T0]  # fmt: skip
    return shapes


def _definitions() -> list[dict[str, Any]]:
    record = {"kind": "trait", "key": "bad", "version": 1, "updated_at": T0, "deleted": False}
    deep: Any = {"trait": "x", "gte": 1}
    for _ in range(200):
        deep = {"not": deep}
    return [
        {**record, "body": {"key": "bad", "kind": "median"}},
        {**record, "body": {"key": "other", "kind": "count"}},  # another key than its record's
        {**record, "body": {"key": "bad", "kind": "count", "window": "soon"}},
        {**record, "body": {"key": "bad", "kind": "count", "window": 0.5}},
        {**record, "kind": "audience", "body": {"key": "bad", "when": deep}},
        {**record, "kind": "audience", "body": {"key": "bad", "when": {"trait": "no_such_trait", "gte": 1}}},  # parked
    ]


HAND_MADE: dict[str, Callable[[list[str]], list[dict[str, Any]]]] = {
    "raw_event": lambda profiles: _wrong_raw_events(),
    "identity_command": lambda profiles: _commands("kind", _IDENTITY_TEMPLATES, _IDENTITY_ODDITIES),
    "resolved_event": resolved_oddities,
    "merge_log_entry": merge_oddities,
    "compute_command": lambda profiles: _commands("kind", _COMPUTE_TEMPLATES, compute_oddities(profiles)),
    "definition": lambda profiles: _definitions(),
}


def hand_made(schema: str, profiles: list[str]) -> list[bytes]:
    """The hand-made shapes of `schema` as bytes (encoding copies: the shapes are shared)."""
    return [encode(schema, copy.deepcopy(value)) for value in HAND_MADE[schema](profiles)]


def poison(schema: str, profiles: list[str] = [X]) -> SearchStrategy[bytes | None]:  # noqa: B006 (read only)
    """Bytes a topic of `schema` may carry that a stage can't take as they are (or at least must survive)."""
    valid = strategy_for(REPOSITORY.current(schema)).map(lambda value: encode(schema, value))
    return st.one_of(
        st.none(),
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda tail: b"\xc3\x01" + CODECS[schema].fingerprint + tail),
        valid.flatmap(lambda data: st.integers(0, max(len(data) - 1, 0)).map(lambda cut: data[:cut])),
        valid,
        st.sampled_from(hand_made(schema, profiles)),
    )
