"""What a batch of deliveries becomes in a warehouse: rows for `profiles` and `audience_memberships`, with the
column each trait lands in and the SQL type a value needs (topology/destinations/postgres.py writes them).

- A trait change sets one column of its profile's row: the trait's name in Segment's warehouse style (snake_case,
  at most 63 bytes; a name that is one of the table's own columns gets a `trait_` prefix).
- An audience change sets the profile's row in `audience_memberships` (member, since, seq).
- Both carry the profile's identifiers (userId, anonymousId, email as compute last knew them).

Every value is guarded by its change's `seq`: a profile's trait and audience changes interleave, and a retried or
redelivered one may arrive after a newer one of another subject, so the newer value wins per column (the row keeps
the seq of each column's value in `_seqs`), not per row. A batch is folded first, one row per profile and per
(profile, audience), because one INSERT ... ON CONFLICT may not touch a row twice.

A column's type is set by the first value it gets and never changed: booleans `boolean`, numbers `numeric`
(integer sums that turn fractional stay in one column), strings `text`, objects and lists `jsonb`. A later value
that does not fit is refused (`Misfit`): the delivery is dead-lettered naming the column and both types, never
written as something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agents.sync.payloads import Delivery

PROFILE_COLUMNS = ("profile_id", "user_id", "anonymous_id", "email", "seq", "updated_at", "uuid_ts", "_seqs")
MAX_IDENTIFIER = 63
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_OTHER = re.compile(r"[^a-z0-9_]+")


class Misfit(ValueError):
    """A value that does not fit the type its column has."""


def column_name(trait: str) -> str:
    """The `profiles` column of a trait: `firstName` -> `first_name`, `Plan Tier` -> `plan_tier`."""
    name = _OTHER.sub("_", _CAMEL.sub("_", trait).lower()).strip("_") or "trait"
    if name[0].isdigit() or name in PROFILE_COLUMNS:
        name = f"trait_{name}"
    return name.encode()[:MAX_IDENTIFIER].decode(errors="ignore")


def sql_type(value: Any) -> str | None:
    """The type a column made for `value` gets (None: a null says nothing about its type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "numeric"
    if isinstance(value, str):
        return "text"
    return "jsonb"


def check_fits(column: str, have: str, value: Any) -> None:
    """Raise Misfit unless `value` can be written to `column` of type `have` (as information_schema names it)."""
    want = sql_type(value)
    if want is None or have == want or (have == "jsonb"):
        return
    raise Misfit(f"column {column} is {have}; the value {str(value)[:80]!r} is {want} (a column's type is never changed)")


@dataclass
class ProfileRow:
    profile_id: str
    seq: int = -1
    updated_at: int = 0  # ms: the newest change's event time
    identifiers: dict[str, str | None] = field(default_factory=lambda: {"user_id": None, "anonymous_id": None, "email": None})
    values: dict[str, Any] = field(default_factory=dict)  # column -> value
    seqs: dict[str, int] = field(default_factory=dict)  # column -> the seq of its value


@dataclass
class MembershipRow:
    profile_id: str
    audience: str
    member: bool
    since: int  # ms: the change's event time
    seq: int


@dataclass
class Batch:
    profiles: dict[str, ProfileRow] = field(default_factory=dict)
    memberships: dict[tuple[str, str], MembershipRow] = field(default_factory=dict)
    columns: dict[str, str | None] = field(default_factory=dict)  # column -> the type its values in this batch ask for


def fold(deliveries: list[Delivery]) -> Batch:
    """The rows a batch writes: per profile and column, and per (profile, audience), the value of the highest seq."""
    batch = Batch()
    for delivery in deliveries:
        kind, _, name = delivery.subject.partition(":")
        payload = delivery.payload
        row = batch.profiles.setdefault(delivery.profile_id, ProfileRow(delivery.profile_id))
        if delivery.seq > row.seq:
            row.seq, row.updated_at = delivery.seq, delivery.happened_at
            row.identifiers = {"user_id": payload.get("userId"), "anonymous_id": payload.get("anonymousId"), "email": email_of(payload)}
        if kind == "trait":
            column, value = column_name(name), (payload.get("traits") or {}).get(name)
            if delivery.seq > row.seqs.get(column, -1):
                row.values[column], row.seqs[column] = value, delivery.seq
                batch.columns[column] = batch.columns.get(column) or sql_type(value)
        elif kind == "audience":
            member = payload.get("event") == "Audience Entered" if payload.get("type") == "track" else bool((payload.get("traits") or {}).get(name))
            held = batch.memberships.get((delivery.profile_id, name))
            if held is None or delivery.seq > held.seq:
                batch.memberships[(delivery.profile_id, name)] = MembershipRow(delivery.profile_id, name, member, delivery.happened_at, delivery.seq)
    return batch


def email_of(payload: dict[str, Any]) -> str | None:
    traits = (payload.get("traits") if payload.get("type") == "identify" else (payload.get("context") or {}).get("traits")) or {}
    email = traits.get("email")
    return email if isinstance(email, str) else None
