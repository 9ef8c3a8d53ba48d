"""Identity rules and identifier extraction (the identity stage's building blocks; the stage itself is issue 3)."""

from __future__ import annotations

import pytest

from agents.durations import DAY_MS
from agents.errors import ConfigError
from agents.identity.identifiers import ExtractedIdentifier as Identifier, extract
from agents.identity.rules import IdentityRules, Limit, parse_limit, parse_rules


def event(**fields: object) -> dict:
    base = {"type": "track", "user_id": None, "anonymous_id": None, "group_id": None, "traits": {}, "context": {}, "properties": {}}
    return {**base, **fields}


def test_the_product_example_config_parses_with_priorities_and_periods() -> None:
    rules = parse_rules({
        "identifiers": [{"type": "user_id", "limit": 1}, {"type": "email", "limit": "5 weekly", "paths": ["traits.email", "context.traits.email"]},
                        {"type": "anonymous_id", "limit": 100}],
        "blocked": ["^[0-]*$", "-1", "null", "anonymous"], "max_merges": 100, "max_identifiers": 1000,
    })  # fmt: skip
    assert rules.rule("email").limit == Limit(5, 7 * DAY_MS) and rules.rule("user_id").limit == Limit(1)
    assert sorted(["ios.id", "anonymous_id", "email", "user_id", "android.id"], key=rules.priority) == [
        "user_id", "email", "anonymous_id", "android.id", "ios.id"
    ]  # fmt: skip
    assert rules.rule("ios.id").limit == Limit(5), "unconfigured types get Segment's default limit"


@pytest.mark.parametrize("raw", [0, "0", "five", "5 fortnightly", True, -1])
def test_bad_limits_are_config_errors(raw: object) -> None:
    with pytest.raises(ConfigError, match="limit"):
        parse_limit(raw, "identity.identifiers[0].limit")


def test_bad_identity_sections_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown keys in identity"):
        parse_rules({"identifers": []})
    with pytest.raises(ConfigError, match="twice"):
        parse_rules({"identifiers": [{"type": "email"}, {"type": "email"}]})
    with pytest.raises(ConfigError, match="max_merges"):
        parse_rules({"max_merges": 0})


@pytest.mark.parametrize("value", ["0000", "0-0-0", "-1", "null", "anonymous", "undefined", "", "  "])
def test_default_blocked_values(value: str) -> None:
    assert IdentityRules().is_blocked(value)


@pytest.mark.parametrize("value", ["u1", "10", "null-user", "anonymous1", "a@b.co"])
def test_ordinary_values_are_not_blocked(value: str) -> None:
    assert not IdentityRules().is_blocked(value)


def test_extract_finds_every_default_type_in_priority_order() -> None:
    rules = IdentityRules()
    found = extract(
        event(
            type="identify", user_id="u1", anonymous_id="a1", traits={"email": "x@y.io"},
            context={"traits": {"email": "x@y.io"}, "device": {"type": "ios", "id": "dev1", "advertisingId": "ad1",
                     "adTrackingEnabled": True, "token": "push1"}, "externalIds": [{"id": "crm-9", "type": "crm_id"}]},
        ),
        rules,
    )  # fmt: skip
    assert found == [
        Identifier("user_id", "u1"), Identifier("email", "x@y.io"), Identifier("anonymous_id", "a1"),
        Identifier("crm_id", "crm-9"), Identifier("ios.id", "dev1"), Identifier("ios.idfa", "ad1"),
        Identifier("ios.push_token", "push1"),
    ]  # fmt: skip


def test_blocked_values_are_kept_but_marked_and_ad_ids_need_tracking_consent() -> None:
    found = extract(event(anonymous_id="anonymous", user_id="u2", context={"device": {"type": "android", "advertisingId": "ad2"}}), IdentityRules())
    assert found == [Identifier("user_id", "u2"), Identifier("anonymous_id", "anonymous", blocked=True)]


def test_group_traits_email_is_the_group_s_not_the_user_s() -> None:
    found = extract(event(type="group", user_id="u3", group_id="g1", traits={"email": "team@acme.io"}), IdentityRules())
    assert found == [Identifier("user_id", "u3"), Identifier("group_id", "g1")]


def test_configured_paths_add_custom_identifiers() -> None:
    rules = parse_rules({"identifiers": [{"type": "user_id", "limit": 1}, {"type": "account_id", "paths": ["properties.account.id"]}]})
    found = extract(event(user_id="u4", properties={"account": {"id": 77}}), rules)
    assert found == [Identifier("user_id", "u4"), Identifier("account_id", "77")]
