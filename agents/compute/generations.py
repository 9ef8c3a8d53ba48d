"""Which state each definition's current version computes into, so a new or changed definition starts afresh.

A trait's state lives under a *state id*: its key, its version and a hash of its JSON (`orders@3.1f2e…`). A new
version (a POST, an edited config file, `cdp backfill`) gets a new id, so its state is rebuilt from the history
in Kafka by a backfill while the old id's states are dropped as profiles are touched; values and memberships
keep their user-facing keys, so a rebuilt trait emits a change only where its value really moved. A hidden
event counter is named by what it counts (catalog.counter_key) and by the lowest version of the audiences that
count it themselves (`~1a2b…@2`): audiences asking the same question share it, an audience that only re-uses
counted questions needs no events re-read, and a counter dropped and later asked for again starts afresh
rather than on top of state some profiles kept from before.

A *generation* is one version of one definition: what a partition must backfill once (its new state ids) and
then settle (re-evaluate every profile), e.g. `trait:orders@3.1f2e…`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import orjson

from agents.compute.catalog import Catalog, counter_key, requirements
from agents.compute.definitions import TraitDefinition, leaves


@dataclass(frozen=True)
class Live:
    """The definitions a worker runs now: the catalog, the state id of each trait and counter, the generations."""

    catalog: Catalog
    sids: Mapping[str, str]  # all_traits key -> state id
    generations: Mapping[str, tuple[str, ...]]  # generation id -> the state ids it computes
    by_sid: Mapping[str, tuple[str, TraitDefinition]]  # state id -> (all_traits key, definition)
    audience_sids: Mapping[str, frozenset[str]]  # audience -> every state id its membership reads
    position: int = 0  # how far into cdp.definitions these are: compute never acts on older ones than it has

    @classmethod
    def of(cls, catalog: Catalog, versions: Mapping[tuple[str, str], int]) -> Live:
        """`versions`: (kind, key) -> version (0 for the config file's)."""
        introduced: dict[str, int] = {}  # counter -> the lowest version of an audience that counts it itself
        for key, audience in catalog.audiences.items():
            for _, leaf in leaves(audience.when, "when"):
                if "event" in leaf:
                    counter, version = counter_key(leaf), versions.get(("audience", key), 0)
                    introduced[counter] = min(introduced.get(counter, version), version)
        sids = {key: f"{key}@{introduced.get(key, 0)}" for key in catalog.counters}
        generations: dict[str, tuple[str, ...]] = {}
        for key in catalog.traits:
            tag = _tag(catalog, "trait", key, versions)
            sids[key] = f"{key}@{tag}"
            generations[f"trait:{key}@{tag}"] = (sids[key],)
        audience_sids = {}
        for key in catalog.audiences:
            needed = requirements(catalog, key)
            audience_sids[key] = frozenset(sids[k] for k in needed)
            counted = sorted(sids[k] for k in needed if k in catalog.counters)
            generations[f"audience:{key}@{_tag(catalog, 'audience', key, versions)}"] = tuple(counted)
        by_sid = {sid: (key, catalog.all_traits[key]) for key, sid in sids.items()}
        return cls(catalog, MappingProxyType(sids), MappingProxyType(generations), MappingProxyType(by_sid),
                   MappingProxyType(audience_sids))  # fmt: skip

    @classmethod
    def of_catalog(cls, catalog: Catalog) -> Live:
        """Every definition at version 0 (the config file's; tests)."""
        return cls.of(catalog, {})


def _tag(catalog: Catalog, kind: str, key: str, versions: Mapping[tuple[str, str], int]) -> str:
    body = orjson.dumps(catalog.sources[(kind, key)], option=orjson.OPT_SORT_KEYS)
    return f"{versions.get((kind, key), 0)}.{hashlib.sha1(body).hexdigest()[:8]}"
