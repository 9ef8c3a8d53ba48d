"""Destination definitions: every problem named at once; a good one parsed with its defaults."""

from __future__ import annotations

import pytest

from agents.errors import ConfigError
from agents.sync.destinations import DEFAULT_MAX_AGE_MS, parse_destination
from topology.destinations import CHECKS, REDACTED, redacted

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes of base64
GOOD = {"name": "crm", "kind": "webhook", "url": "https://crm.example/hook", "secret": SECRET}


def test_a_webhook_with_only_its_url_and_secret_takes_the_defaults() -> None:
    destination = parse_destination(GOOD, CHECKS, audiences={"big"})
    assert destination.subscribe == {"audience_membership", "trait_changes"}
    assert destination.audience_calls == ("identify",)
    assert destination.max_age_ms == DEFAULT_MAX_AGE_MS and destination.rate_per_s is None
    assert destination.settings == {"url": GOOD["url"], "secrets": [SECRET], "timeout_ms": 10_000, "batch_size": 1}
    assert destination.wants_audience("big") and destination.wants_trait("ltv")


def test_filters_rate_and_retry_are_read() -> None:
    destination = parse_destination({**GOOD, "subscribe": ["audience_membership"], "audiences": ["big"], "rate_limit": "600/m",
                                     "retry": {"base": "200ms", "cap": "5s"}, "max_age": "1h", "audience_calls": ["track", "identify"]},
                                    CHECKS, audiences={"big", "small"})  # fmt: skip
    assert destination.rate_per_s == 10 and destination.retry_base_ms == 200 and destination.retry_cap_ms == 5_000
    assert destination.wants_audience("big") and not destination.wants_audience("small") and not destination.wants_trait("ltv")
    assert destination.audience_calls == ("track", "identify")


@pytest.mark.parametrize(("change", "named"), [
    ({"kind": "carrier-pigeon"}, "unknown kind 'carrier-pigeon'"),
    ({"url": "ftp://x"}, "url must be an http:// or https:// URL"),
    ({"url": "not a url"}, "url must be"),
    ({"secret": None}, "secret is required"),
    ({"secret": "whsec_short"}, "secret is required"),
    ({"audiences": ["nope"]}, "unknown audience 'nope'"),
    ({"subscribe": ["events"]}, "event subscriptions are not built yet"),
    ({"rate_limit": "fast"}, "rate_limit is like '100/s'"),
    ({"max_age": "forever"}, "max_age: not a duration"),
    ({"name": "Has Spaces"}, "name must be"),
    ({"timeout": "0s"}, "timeout"),
    ({"batch": {"size": 0}}, "batch is {size: 1..1000}"),
    ({"colour": "blue"}, "unknown webhook setting colour"),
])  # fmt: skip
def test_a_bad_definition_is_refused_naming_the_problem(change: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        parse_destination({**GOOD, **change}, CHECKS, audiences={"big"})


def test_every_problem_is_named_in_one_error() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_destination({**GOOD, "url": "x", "secret": None, "audiences": ["nope"]}, CHECKS, audiences=set())
    assert all(part in str(refused.value) for part in ("url must be", "secret is required", "unknown audience"))


def test_secrets_are_never_shown_back() -> None:
    shown = redacted({**GOOD, "secret": [SECRET, SECRET]})
    assert shown["secret"] == REDACTED and shown["url"] == GOOD["url"]


def test_a_kafka_destination_needs_a_topic_and_may_name_its_own_cluster() -> None:
    destination = parse_destination({"name": "lake", "kind": "kafka", "topic": "crm.audiences", "bootstrap": "other:9092"}, CHECKS)
    assert destination.settings == {"topic": "crm.audiences", "bootstrap": "other:9092", "timeout_ms": 30_000, "batch_size": 100}
    with pytest.raises(ConfigError) as refused:
        parse_destination({"name": "lake", "kind": "kafka", "topic": "no spaces", "url": "http://x"}, CHECKS)
    assert "topic must be a Kafka topic name" in str(refused.value) and "unknown kafka setting url" in str(refused.value)
