"""What a batch of deliveries becomes in the warehouse: column names, types, and the fold of a batch into one row per
profile and per (profile, audience), checked against a simple oracle (the highest seq's value wins per column)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.errors import ConfigError
from agents.sync.destinations import parse_destination
from agents.sync.payloads import membership_deliveries, trait_deliveries
from agents.sync.warehouse import Misfit, check_fits, column_name, fold, sql_type
from topology.destinations import CHECKS, redacted

WAREHOUSE = {"name": "dw", "kind": "postgres", "dsn": "postgresql://cdp:secret@db:5432/analytics", "audience_calls": ["identify", "track"]}


def test_trait_names_become_segment_style_columns() -> None:
    assert column_name("firstName") == "first_name"
    assert column_name("Plan Tier") == "plan_tier"
    assert column_name("ltv_90d") == "ltv_90d"
    assert column_name("email") == "trait_email" and column_name("seq") == "trait_seq"  # the table's own columns
    assert column_name("90d") == "trait_90d"
    assert len(column_name("x" * 200).encode()) == 63
    assert column_name("!!!") == "trait"


def test_a_column_keeps_the_type_of_its_first_value() -> None:
    assert [sql_type(v) for v in (True, 3, 2.5, "a", {"a": 1}, [1], None)] == ["boolean", "numeric", "numeric", "text", "jsonb", "jsonb", None]
    check_fits("ltv", "numeric", 3.25)
    check_fits("ltv", "numeric", None)
    check_fits("blob", "jsonb", "anything")
    with pytest.raises(Misfit, match="column ltv is numeric; the value 'lots' is text"):
        check_fits("ltv", "numeric", "lots")
    with pytest.raises(Misfit):
        check_fits("vip", "boolean", 1)


def test_postgres_definitions_are_checked_and_the_dsn_is_never_shown() -> None:
    destination = parse_destination(WAREHOUSE, CHECKS)
    assert destination.settings == {"dsn": WAREHOUSE["dsn"], "schema": None, "timeout_ms": 30_000, "batch_size": 500}
    assert redacted(WAREHOUSE)["dsn"] == "<redacted>"
    with pytest.raises(ConfigError) as refused:
        parse_destination({"name": "dw", "kind": "postgres", "dsn": "mysql://x", "schema": "Bad-Name", "port": 5}, CHECKS)
    for problem in ("dsn is required", "schema is 1-63", "unknown postgres setting port"):
        assert problem in str(refused.value)


changes = st.lists(
    st.tuples(
        st.sampled_from(["p1", "p2", "p3"]),
        st.one_of(st.tuples(st.just("trait"), st.sampled_from(["ltv", "plan", "vip"]), st.one_of(st.none(), st.integers(0, 9), st.text(max_size=3))),
                  st.tuples(st.just("audience"), st.sampled_from(["big", "new"]), st.booleans())),
        st.integers(1, 50),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(changes)
def test_a_batch_folds_to_the_newest_value_of_each_column_and_membership(batch: list) -> None:
    destination = parse_destination(WAREHOUSE, CHECKS)
    deliveries, oracle_values, oracle_members, newest = [], {}, {}, {}
    for profile, (kind, name, value), seq in batch:
        base = {"profile_id": profile, "timestamp": seq * 1000, "seq": seq, "message_id": None, "user_id": f"u{seq}", "anonymous_id": None, "email": None}
        if kind == "trait":
            made = trait_deliveries({**base, "trait": name, "origin": "computed", "old_value": None, "new_value": value}, destination)
            key, table = (profile, column_name(name)), oracle_values
        else:
            made = membership_deliveries({**base, "audience": name, "transition": "entered" if value else "exited", "reason": "t"}, destination)
            key, table = (profile, name), oracle_members
        deliveries.extend(made)
        if key not in table or seq > table[key][0]:
            table[key] = (seq, value)
        newest[profile] = max(newest.get(profile, 0), seq)
    folded = fold(deliveries)
    assert {(p, c): (row.seqs[c], v) for p, row in folded.profiles.items() for c, v in row.values.items()} == oracle_values
    assert {k: (m.seq, m.member) for k, m in folded.memberships.items()} == oracle_members
    assert {p: (row.seq, row.identifiers["user_id"]) for p, row in folded.profiles.items()} == {p: (s, f"u{s}") for p, s in newest.items()}
