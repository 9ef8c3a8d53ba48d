"""A destination definition, checked once: which changes go where, how fast, and for how long they are retried.

    {"name": "crm", "kind": "webhook", "url": "https://...", "secret": "whsec_...",
     "subscribe": ["audience_membership", "trait_changes"], "audiences": ["big_spenders"], "traits": ["ltv"],
     "audience_calls": ["identify", "track"], "rate_limit": "100/s", "max_age": "4h",
     "retry": {"base": "1s", "cap": "10m"}, "concurrency": 4, "backlog": 100000}

The keys above are every kind's; a kind's own (a webhook's `url`, `secret`, `timeout`, `batch`) are checked by the
kind (topology/destinations/), handed in as `kinds`, so this module knows no kind. Every problem is named in one
ConfigError (HTTP 400 on the definitions API, a stop at start for the config file).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from agents.durations import parse_duration_ms
from agents.errors import ConfigError

KindCheck = Callable[[Mapping[str, Any]], Mapping[str, Any]]  # a kind's own settings, checked (ConfigError if not)
SUBSCRIPTIONS = ("audience_membership", "trait_changes")  # "events" comes with the resolved-events input
AUDIENCE_CALLS = ("identify", "track")
COMMON_KEYS = {"name", "kind", "subscribe", "audiences", "traits", "audience_calls", "rate_limit", "max_age", "retry",
               "concurrency", "backlog", "disabled"}  # fmt: skip
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_MAX_AGE_MS = 4 * 3_600_000  # Segment retries for 4 hours
DEFAULT_RETRY_BASE_MS, DEFAULT_RETRY_CAP_MS = 1_000, 600_000
DEFAULT_CONCURRENCY, DEFAULT_BACKLOG = 4, 100_000


@dataclass(frozen=True)
class Destination:
    """One destination as the sync stage runs it."""

    name: str
    kind: str
    subscribe: frozenset[str]
    audiences: frozenset[str] | None  # None: every audience
    traits: frozenset[str] | None  # None: every trait
    audience_calls: tuple[str, ...]
    rate_per_s: float | None  # None: unlimited
    max_age_ms: int
    retry_base_ms: int
    retry_cap_ms: int
    concurrency: int
    backlog: int  # deliveries waiting, per destination, over all partitions; past it new ones are dead-lettered
    settings: Mapping[str, Any]  # the kind's own, as its check returned them
    disabled: Mapping[str, Any] | None = None  # {"at": ms, "reason": ...}: a 410 turned it off until POSTed again

    def wants_audience(self, audience: str) -> bool:
        return "audience_membership" in self.subscribe and (self.audiences is None or audience in self.audiences)

    def wants_trait(self, trait: str) -> bool:
        return "trait_changes" in self.subscribe and (self.traits is None or trait in self.traits)


def parse_destination(body: Any, kinds: Mapping[str, KindCheck], audiences: Collection[str] | None = None,
                      traits: Collection[str] | None = None) -> Destination:  # fmt: skip
    """The destination `body` defines; ConfigError naming every problem. `audiences`, `traits`: the keys defined
    now (an audience filter naming one that does not exist is a typo); None: not checked."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"a destination definition is a JSON object, not {body!r:.80}")
    problems: list[str] = []
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"name must be 1-64 of a-z, 0-9, '_' and '-' (starting with a letter or digit), not {name!r:.80}")
    kind = body.get("kind")
    settings: Mapping[str, Any] = {}
    if kind not in kinds:
        problems.append(f"unknown kind {kind!r:.40}; kinds: {', '.join(sorted(kinds))}")
    else:
        try:
            settings = kinds[kind]({k: v for k, v in body.items() if k not in COMMON_KEYS})
        except ConfigError as exc:
            problems.append(str(exc))
    subscribe = _names(body, "subscribe", SUBSCRIPTIONS, problems, default=SUBSCRIPTIONS)
    chosen_audiences = _filter(body, "audiences", audiences, problems)
    chosen_traits = _filter(body, "traits", traits, problems)
    calls = _names(body, "audience_calls", AUDIENCE_CALLS, problems, default=("identify",))
    rate = _rate(body.get("rate_limit"), problems)
    max_age = _duration(body, "max_age", DEFAULT_MAX_AGE_MS, problems)
    retry = body.get("retry") or {}
    if not isinstance(retry, Mapping) or set(retry) - {"base", "cap"}:
        problems.append(f"retry is {{base: <duration>, cap: <duration>}}, not {retry!r:.80}")
        retry = {}
    base = _duration(retry, "base", DEFAULT_RETRY_BASE_MS, problems, "retry.base")
    cap = _duration(retry, "cap", DEFAULT_RETRY_CAP_MS, problems, "retry.cap")
    if base <= 0 or cap < base:
        problems.append(f"retry needs 0 < base <= cap (base {base} ms, cap {cap} ms)")
    concurrency = _count(body, "concurrency", DEFAULT_CONCURRENCY, 1, 256, problems)
    backlog = _count(body, "backlog", DEFAULT_BACKLOG, 1, 100_000_000, problems)
    disabled = body.get("disabled")
    if disabled is not None and not isinstance(disabled, Mapping):
        problems.append("disabled is set by the sync stage on a 410 (an object); POST the definition without it to enable")
    if problems:
        raise ConfigError(f"destination {name!r:.70}: " + "; ".join(problems))
    return Destination(
        name=name, kind=kind, subscribe=frozenset(subscribe), audiences=chosen_audiences, traits=chosen_traits,
        audience_calls=tuple(calls), rate_per_s=rate, max_age_ms=max_age, retry_base_ms=base, retry_cap_ms=cap,
        concurrency=concurrency, backlog=backlog, settings=settings, disabled=disabled,
    )  # fmt: skip


def _names(body: Mapping[str, Any], key: str, allowed: tuple[str, ...], problems: list[str], default: tuple[str, ...]) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} is a non-empty list of {', '.join(allowed)}")
        return default
    unknown = [v for v in value if v not in allowed]
    if unknown:
        hint = " (event subscriptions are not built yet)" if "events" in unknown else ""
        problems.append(f"{key}: unknown {', '.join(repr(v)[:40] for v in unknown)}; one of {', '.join(allowed)}{hint}")
    return tuple(dict.fromkeys(v for v in value if v in allowed))


def _filter(body: Mapping[str, Any], key: str, known: Collection[str] | None, problems: list[str]) -> frozenset[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} is a list of {key} keys")
        return None
    if known is not None and key == "audiences":  # traits include identify traits, which no definition lists
        missing = sorted(set(value) - set(known))
        if missing:
            problems.append(f"unknown audience {', '.join(repr(m)[:60] for m in missing)}")
    return frozenset(value)


def _rate(value: Any, problems: list[str]) -> float | None:
    if value is None:
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        problems.append(f"rate_limit is like '100/s', '600/m' or '5000/h', not {value!r:.40}")
        return None
    return float(match.group(1)) / _PER_S[match.group(2)]


def _duration(section: Mapping[str, Any], key: str, default: int, problems: list[str], label: str | None = None) -> int:
    value = section.get(key)
    if value is None:
        return default
    try:
        return parse_duration_ms(value)
    except (ValueError, TypeError) as exc:
        problems.append(f"{label or key}: {exc}")
        return default


def _count(body: Mapping[str, Any], key: str, default: int, low: int, high: int, problems: list[str]) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.append(f"{key} is a whole number from {low} to {high}, not {value!r:.40}")
        return default
    return value
