"""Resolving one event against the identity graph: Segment's flat matching with merge protection.

Reads:  one event's identifiers (agents.identity.identifiers.extract) and the two graph tables.
Yields: the profile the event resolves to, and the merge-log entries (merged / refused / demoted) it caused.
State:  profile_by_identifier: "type:value" -> the profile it was first mapped to (follow `merged_into` to the
        survivor); profiles: profile id -> ProfileState. Both are MutableMappings: dicts in tests, tables later.
Errors: none; every event resolves to exactly one profile.

The decision (Segment, cdp-semantics.md §1.3): look up every non-blocked identifier of the event; none known ->
a new profile; one profile -> attach the new identifiers; several -> merge them into the oldest. When attaching
or merging would break a rule (a per-type limit, max_merges, max_identifiers), the lowest-priority identifier of
the event is demoted (left unlinked, logged) and the matching starts again. This module decides for one
writer; making the graph race-free across partitions is the stage's job (docs/identity.md).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from agents.events import MergeLogEntry
from agents.identity.identifiers import ExtractedIdentifier
from agents.identity.rules import IdentityRules


class ProfileState(TypedDict):
    """One profile of the graph; a merged one keeps only its pointer to the survivor."""

    id: str
    created_at: int
    identifiers: dict[str, int]  # "type:value" -> event time it was added
    merged_into: str | None
    merged_from: list[str]
    merges: int  # profiles folded into this one, directly or through them


@dataclass
class Resolution:
    """What resolving one event decided."""

    profile_id: str
    created: bool = False
    log: list[MergeLogEntry] = field(default_factory=list)


def identifier_key(identifier: ExtractedIdentifier) -> str:
    return f"{identifier.type}:{identifier.value}"


def profile_id_for(message_id: str) -> str:
    """A profile's id is derived from the event that created it, so a replay creates the same ids."""
    return "p-" + hashlib.sha1(message_id.encode()).hexdigest()[:24]


def survivor_of(profiles: MutableMapping[str, ProfileState], profile_id: str) -> str:
    """Follow merge pointers to the profile that absorbed `profile_id` (itself if never merged)."""
    state = profiles[profile_id]
    while state["merged_into"] is not None:
        state = profiles[state["merged_into"]]
    return state["id"]


def resolve(
    identifiers: Sequence[ExtractedIdentifier],
    *,
    message_id: str,
    timestamp: int,
    rules: IdentityRules,
    profile_by_identifier: MutableMapping[str, str],
    profiles: MutableMapping[str, ProfileState],
) -> Resolution:
    """Resolve one event; its identifiers come most trusted first, as `extract` returns them."""
    log: list[MergeLogEntry] = []
    candidates = [i for i in identifiers if not i.blocked]
    while True:  # ends: each round returns or demotes one identifier, and no identifiers always fit
        matched = _matched_profiles(candidates, profile_by_identifier, profiles)
        if not matched:
            new = _new_profile(candidates, message_id, timestamp, rules)
            if new is not None:
                for key in new["identifiers"]:
                    profile_by_identifier[key] = new["id"]
                profiles[new["id"]] = new
                return Resolution(new["id"], created=True, log=log)
            target, reason = profile_id_for(message_id), "limit within one event"
        else:
            survivor = min(matched, key=lambda s: (s["created_at"], s["id"]))
            others = [s for s in matched if s is not survivor]
            added = [i for i in candidates if identifier_key(i) not in survivor["identifiers"]]
            reason = _broken_rule(survivor, others, added, timestamp, rules)
            if reason is None:
                applied = _apply(survivor, others, added, candidates, message_id, timestamp, log, profile_by_identifier, profiles)
                return Resolution(applied, log=log)
            target = survivor["id"]
            # A refused join: a merge of each other profile, or (none) attaching the event's new identifiers.
            log.extend(_entry("refused", target, o["id"], candidates, message_id, timestamp, reason) for o in others)
            if not others:
                log.append(_entry("refused", target, None, added, message_id, timestamp, reason))
        demoted = candidates.pop()  # the least trusted identifier of the event
        log.append(_entry("demoted", target, None, [demoted], message_id, timestamp, reason))


def _matched_profiles(
    candidates: Sequence[ExtractedIdentifier],
    profile_by_identifier: MutableMapping[str, str],
    profiles: MutableMapping[str, ProfileState],
) -> list[ProfileState]:
    seen: dict[str, ProfileState] = {}
    for identifier in candidates:
        mapped = profile_by_identifier.get(identifier_key(identifier))
        if mapped is not None:
            root = survivor_of(profiles, mapped)
            seen.setdefault(root, profiles[root])
    return list(seen.values())


def _new_profile(
    candidates: Sequence[ExtractedIdentifier], message_id: str, timestamp: int, rules: IdentityRules
) -> ProfileState | None:
    """A profile of the event's own identifiers, or None when they alone break a rule (then demote)."""
    state = ProfileState(
        id=profile_id_for(message_id), created_at=timestamp, identifiers={}, merged_into=None, merged_from=[], merges=0
    )
    if _broken_rule(state, [], list(candidates), timestamp, rules) is not None:
        return None
    state["identifiers"] = {identifier_key(i): timestamp for i in candidates}
    return state


def _broken_rule(
    survivor: ProfileState, others: Sequence[ProfileState], added: Sequence[ExtractedIdentifier], now: int, rules: IdentityRules
) -> str | None:
    """The rule that joining `others` and `added` into `survivor` would break, in words; None if none."""
    combined: dict[str, int] = dict(survivor["identifiers"])
    for other in others:
        combined.update(other["identifiers"])
    for identifier in added:
        combined.setdefault(identifier_key(identifier), now)
    if others and survivor["merges"] + sum(1 + o["merges"] for o in others) > rules.max_merges:
        return f"max_merges {rules.max_merges}"
    if len(combined) > rules.max_identifiers and len(combined) > len(survivor["identifiers"]):
        return f"max_identifiers {rules.max_identifiers}"
    counts: Counter[str] = Counter()
    for key, added_at in combined.items():
        type_ = key.split(":", 1)[0]
        period = rules.rule(type_).limit.period_ms
        if period is None or now - added_at < period:
            counts[type_] += 1
    for type_, count in counts.items():
        limit = rules.rule(type_).limit
        if count > limit.count:
            return f"{type_} limit {limit.count}" + ("" if limit.period_ms is None else f" per {limit.period_ms // 86_400_000}d")
    return None


def _apply(
    survivor: ProfileState,
    others: Sequence[ProfileState],
    added: Sequence[ExtractedIdentifier],
    candidates: Sequence[ExtractedIdentifier],
    message_id: str,
    timestamp: int,
    log: list[MergeLogEntry],
    profile_by_identifier: MutableMapping[str, str],
    profiles: MutableMapping[str, ProfileState],
) -> str:
    """Merge `others` into `survivor` and attach `added`; tables get whole new values (changelogs see them)."""
    merged = ProfileState(**survivor)  # type: ignore[typeddict-item]
    merged["identifiers"] = dict(survivor["identifiers"])
    merged["merged_from"] = list(survivor["merged_from"])
    for other in others:
        merged["identifiers"].update(other["identifiers"])
        merged["merged_from"].extend([other["id"], *other["merged_from"]])
        merged["merges"] += 1 + other["merges"]
        profiles[other["id"]] = ProfileState(**{**other, "merged_into": survivor["id"]})  # type: ignore[typeddict-item]
        linking = [i for i in candidates if identifier_key(i) in other["identifiers"] or identifier_key(i) in survivor["identifiers"]]
        log.append(_entry("merged", survivor["id"], other["id"], linking, message_id, timestamp, "identifier match"))
    for identifier in added:
        merged["identifiers"].setdefault(identifier_key(identifier), timestamp)
    profiles[survivor["id"]] = merged
    for identifier in candidates:
        profile_by_identifier[identifier_key(identifier)] = survivor["id"]
    return survivor["id"]


def _entry(
    kind: str, survivor: str, merged: str | None, identifiers: Sequence[ExtractedIdentifier], message_id: str, timestamp: int, rule: str
) -> MergeLogEntry:
    return MergeLogEntry(
        kind=kind,  # type: ignore[typeddict-item]
        survivor_profile_id=survivor,
        merged_profile_id=merged,
        identifiers=[{"type": i.type, "value": i.value} for i in identifiers],
        message_id=message_id,
        timestamp=timestamp,
        rule=rule,
    )
