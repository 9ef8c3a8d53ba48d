"""Identity rules as data: which identifier types exist, their priority, limits and blocked values.

Segment's merge protection (see ../shared/reference/cdp-semantics.md §1.3): list order is priority (user_id
first, email second, the rest after); a limit caps how many values of a type one profile holds, optionally per
period ("5 weekly"); blocked values (exact or regex) never link anything; caps of 100 merges and 1,000
identifiers per profile. Types not configured get Segment's defaults: limit 5, priority after the configured
ones, alphabetically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.durations import DAY_MS
from agents.errors import ConfigError

PERIODS_MS = {"ever": None, "daily": DAY_MS, "weekly": 7 * DAY_MS, "monthly": 30 * DAY_MS, "annually": 365 * DAY_MS}
DEFAULT_BLOCKED = ("^[0-]*$", "-1", "null", "anonymous", "undefined")
DEFAULT_LIMIT = 5
DEFAULT_TYPES: tuple[tuple[str, int], ...] = (("user_id", 1), ("email", 5))
_LIMIT = re.compile(r"^\s*(\d+)\s*(ever|daily|weekly|monthly|annually)?\s*$")


@dataclass(frozen=True)
class Limit:
    """At most `count` values of a type per profile, counted over `period_ms` (None: ever)."""

    count: int
    period_ms: int | None = None


@dataclass(frozen=True)
class IdentifierRule:
    """One identifier type: its name, limit and (for custom types) where to find it on an event."""

    type: str
    limit: Limit = Limit(DEFAULT_LIMIT)
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class IdentityRules:
    """The whole identity config; `priority(type)` is 0 for the most trusted type."""

    identifiers: tuple[IdentifierRule, ...] = tuple(IdentifierRule(t, Limit(n)) for t, n in DEFAULT_TYPES)
    blocked: tuple[str, ...] = DEFAULT_BLOCKED
    max_merges: int = 100
    max_identifiers: int = 1_000
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        patterns = []
        for entry in self.blocked:
            try:
                patterns.append(re.compile(entry))
            except re.error:
                patterns.append(re.compile(re.escape(entry)))
        object.__setattr__(self, "_patterns", tuple(patterns))

    def rule(self, type_: str) -> IdentifierRule:
        return next((r for r in self.identifiers if r.type == type_), IdentifierRule(type_))

    def priority(self, type_: str) -> tuple[int, str]:
        """Sort key: configured types in list order, then any other type alphabetically."""
        for index, rule in enumerate(self.identifiers):
            if rule.type == type_:
                return (index, "")
        return (len(self.identifiers), type_)

    def describe_limit(self, type_: str) -> str:
        """A type's limit in words, as merge-log entries name the rule that decided: `email limit 5 per 7d`."""
        limit = self.rule(type_).limit
        return f"{type_} limit {limit.count}" + ("" if limit.period_ms is None else f" per {limit.period_ms // DAY_MS}d")

    def broken_rule(self, held: Sequence[Sequence[Any]], incoming: Sequence[Sequence[Any]], merges: int, now: int) -> str | None:
        """The rule a profile holding `held` would break by taking `incoming` and reaching `merges`; None if none.

        Identifiers are `[type, value, added_at]`; a limit with a period counts only those added within it.
        """
        if merges > self.max_merges:
            return f"max_merges {self.max_merges}"
        combined: dict[tuple[str, str], int] = {(t, v): at for t, v, at in held}
        for type_, value, added_at in incoming:
            combined.setdefault((type_, value), added_at)
        if len(combined) > self.max_identifiers:
            return f"max_identifiers {self.max_identifiers}"
        counts: dict[str, int] = {}
        for (type_, _), added_at in combined.items():
            period = self.rule(type_).limit.period_ms
            if period is None or now - added_at < period:
                counts[type_] = counts.get(type_, 0) + 1
        for type_, count in counts.items():
            if count > self.rule(type_).limit.count:
                return self.describe_limit(type_)
        return None

    def is_blocked(self, value: str) -> bool:
        """Exact or whole-value regex match against the blocked list; empty values are always blocked."""
        return not value.strip() or value in self.blocked or any(p.fullmatch(value) for p in self._patterns)


def parse_limit(raw: Any, where: str) -> Limit:
    """`5`, `"5"`, `"5 weekly"`, `"1 ever"` -> Limit."""
    match = _LIMIT.match(str(raw)) if not isinstance(raw, bool) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"{where}: a limit is a positive count, optionally with a period (e.g. 5 or '5 weekly'), not {raw!r}")
    return Limit(int(match.group(1)), PERIODS_MS[match.group(2) or "ever"])


def parse_rules(raw: Mapping[str, Any]) -> IdentityRules:
    """The `identity:` section of the config; raises ConfigError naming the bad entry."""
    known = {"identifiers", "blocked", "max_merges", "max_identifiers"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown keys in identity: {sorted(unknown)}; known: {sorted(known)}")
    defaults = IdentityRules()
    identifiers = defaults.identifiers
    if "identifiers" in raw:
        identifiers = tuple(_identifier(item, index) for index, item in enumerate(_list(raw["identifiers"], "identity.identifiers")))
        types = [rule.type for rule in identifiers]
        if len(set(types)) != len(types):
            raise ConfigError(f"identity.identifiers lists a type twice: {types}")
    blocked = tuple(str(b) for b in _list(raw.get("blocked", list(defaults.blocked)), "identity.blocked"))
    return IdentityRules(
        identifiers=identifiers,
        blocked=blocked,
        max_merges=_positive(raw.get("max_merges", defaults.max_merges), "identity.max_merges"),
        max_identifiers=_positive(raw.get("max_identifiers", defaults.max_identifiers), "identity.max_identifiers"),
    )


def _identifier(item: Any, index: int) -> IdentifierRule:
    where = f"identity.identifiers[{index}]"
    if not isinstance(item, Mapping) or not isinstance(item.get("type"), str) or not item["type"]:
        raise ConfigError(f"{where} needs a type, got {item!r}")
    paths = tuple(str(p) for p in _list(item.get("paths", []), f"{where}.paths"))
    default = dict(DEFAULT_TYPES).get(item["type"], DEFAULT_LIMIT)
    return IdentifierRule(item["type"], parse_limit(item.get("limit", default), f"{where}.limit"), paths)


def _list(raw: Any, where: str) -> Sequence[Any]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where} must be a list, not {raw!r}")
    return raw


def _positive(raw: Any, where: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ConfigError(f"{where} must be a positive integer, not {raw!r}")
    return raw
