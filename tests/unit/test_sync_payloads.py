"""What a change becomes for a destination: Segment Engage's calls, naming the profile, with stable ids; and the
webhook signature as the Standard Webhooks reference library verifies it."""

from __future__ import annotations

import base64
import time

import orjson
from standardwebhooks import Webhook

from agents.sync.destinations import parse_destination
from agents.sync.payloads import delivery_id, membership_deliveries, trait_deliveries
from topology.destinations import CHECKS
from topology.destinations.webhook import batch_id, signature
from tests.unit.test_sync_destinations import GOOD, SECRET

CHANGE = {"profile_id": "p-1", "audience": "big", "transition": "entered", "timestamp": 1_764_547_200_123, "seq": 7,
          "reason": "trait ltv", "message_id": "m-1", "user_id": "u-1", "anonymous_id": "a-1", "email": "a@b.io"}  # fmt: skip


def test_an_audience_entry_is_an_identify_and_a_track_as_engage_sends_them() -> None:
    destination = parse_destination({**GOOD, "audience_calls": ["identify", "track"]}, CHECKS)
    identify, track = membership_deliveries(CHANGE, destination)
    assert identify.payload == {
        "type": "identify", "userId": "u-1", "anonymousId": "a-1", "traits": {"big": True, "email": "a@b.io"},
        "context": {"personas": {"computation_class": "audience", "computation_key": "big", "computation_id": "big"}},
        "timestamp": "2025-12-01T00:00:00.123Z", "messageId": identify.id,
    }  # fmt: skip
    assert track.payload["event"] == "Audience Entered" and track.payload["properties"] == {"audience_key": "big", "big": True}
    assert track.payload["context"]["traits"] == {"email": "a@b.io"}
    exited = membership_deliveries({**CHANGE, "transition": "exited", "seq": 9}, destination)
    assert exited[0].payload["traits"]["big"] is False and exited[1].payload["event"] == "Audience Exited"
    assert identify.id == delivery_id("crm", "p-1", 7, "identify") != track.id != exited[0].id


def test_a_trait_change_is_an_identify_and_filters_hold() -> None:
    change = {"profile_id": "p-1", "trait": "ltv", "origin": "computed", "old_value": 10, "new_value": 25.5,
              "timestamp": 0, "message_id": None, "seq": 3, "user_id": None, "anonymous_id": "a-1", "email": None}  # fmt: skip
    [delivery] = trait_deliveries(change, parse_destination(GOOD, CHECKS))
    assert delivery.payload["traits"] == {"ltv": 25.5} and "userId" not in delivery.payload
    assert delivery.subject == "trait:ltv" and delivery.payload["context"]["personas"]["computation_class"] == "trait"
    assert trait_deliveries(change, parse_destination({**GOOD, "traits": ["orders"]}, CHECKS)) == []
    assert trait_deliveries(change, parse_destination({**GOOD, "subscribe": ["audience_membership"]}, CHECKS)) == []
    assert membership_deliveries(CHANGE, parse_destination({**GOOD, "audiences": ["other"]}, CHECKS)) == []


def test_the_signature_verifies_with_the_reference_library_also_during_a_rotation() -> None:
    body = orjson.dumps({"type": "identify"})
    old, new = SECRET, "whsec_" + base64.b64encode(b"another secret of 24 byte").decode()
    stamp = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp)}
    signed = signature([base64.b64decode(old[6:]), base64.b64decode(new[6:])], "msg_1", stamp, body)
    for secret in (old, new):
        assert Webhook(secret).verify(body, {**headers, "webhook-signature": signed}) == {"type": "identify"}
    assert batch_id(["a", "b"]) != batch_id(["b", "a"]) and batch_id(["a", "b"]).startswith("msg_")
