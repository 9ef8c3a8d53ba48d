"""Unit tests of topology/codecs.py: the bytes on the wire, schema evolution and every way decoding fails.

The framing is checked against the specs themselves, not against the codec's own helpers: CRC-64-AVRO is
recomputed here from the algorithm in the Avro spec and checked against Apache Avro's published vectors.
"""

from __future__ import annotations

import json
import shutil
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
import fastavro
import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.errors import BadEventError, ConfigError, UndecodableError
from topology.codecs import AvroCodec, SchemaRepository

REPOSITORY = SchemaRepository.load()
T0 = 1_700_000_000_000
EVENT: dict[str, Any] = {
    "message_id": "m-1", "type": "track", "source": "web", "user_id": "u-1", "anonymous_id": None,
    "event": "Order Completed", "name": None, "category": None, "group_id": None, "previous_id": None,
    "properties": {"revenue": 12.5, "currency": "USD"}, "traits": {}, "context": {"ip": "203.0.113.7"},
    "integrations": {"All": True}, "timestamp": T0, "original_timestamp": None, "sent_at": T0 + 1,
    "received_at": T0 + 2, "extra": {"channel": "server"},
}  # fmt: skip
JSON_FIELDS = ("properties", "traits", "context", "integrations", "extra")

EMPTY64 = 0xC15D213AA4D7A795  # the Avro spec's CRC-64-AVRO "empty" value and polynomial


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro spec writes it ("Schema Fingerprints"), independent of any library."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY64 & -(fp & 1))
        table.append(fp)
    fp = EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def wire_form(value: dict[str, Any]) -> dict[str, Any]:
    """`EVENT` as the spec sees it: json fields as JSON text."""
    return {k: orjson.dumps(v).decode() if k in JSON_FIELDS else v for k, v in value.items()}


def mock_registry() -> SchemaRegistryClient:
    return SchemaRegistryClient.new_client({"url": "mock://"})


# --- framing ------------------------------------------------------------------------------------------------
def test_crc64_avro_reproduces_the_published_vectors() -> None:
    """Vectors from Apache Avro's share/test/data/schema-tests.txt (signed 64-bit there)."""
    assert crc64_avro(b'"null"') == 7195948357588979594
    assert crc64_avro(b'"boolean"') == -6970731678124411036 % 2**64
    assert crc64_avro(b'{"name":"foo","type":"fixed","size":15}') == 1756455273707447556
    assert crc64_avro(b'{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}') == (
        7843277075252814651
    )


def without_logical_types(node: Any) -> Any:
    if isinstance(node, list):
        return [without_logical_types(n) for n in node]
    if isinstance(node, dict):
        return {k: without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    return node


@pytest.mark.parametrize("name", REPOSITORY.names())
def test_fingerprint_is_crc64_avro_of_the_canonical_form_little_endian(name: str) -> None:
    """Cross-checked three ways: this file's CRC, fastavro's, and the `avro` package's canonical form + CRC.

    Logical types are stripped before asking `avro`: its canonical form keeps `{"type": "long"}` for a
    timestamp-millis, while the spec's [PRIMITIVES] rule, Java's SchemaNormalization and fastavro give "long"
    (see linkedin/goavro#174). Java's is the form Confluent tooling fingerprints, so it is the one we use.
    """
    schema = REPOSITORY.current(name)
    canonical = to_parsing_canonical_form(schema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", avro.errors.IgnoredLogicalType)
        reference = avro.schema.parse(json.dumps(without_logical_types(schema)))
    assert canonical == reference.canonical_form
    expected = crc64_avro(canonical.encode()).to_bytes(8, "little")
    assert AvroCodec(name, REPOSITORY).fingerprint == expected
    assert bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")) == expected
    assert reference.fingerprint("CRC-64-AVRO") == expected


def test_single_object_framing_is_exactly_the_spec() -> None:
    schema = REPOSITORY.current("raw_event")
    data = AvroCodec("raw_event", REPOSITORY).encode(EVENT)
    body = BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema, named_schemas={}), wire_form(EVENT))
    header = b"\xc3\x01" + crc64_avro(to_parsing_canonical_form(schema).encode()).to_bytes(8, "little")
    assert data == header + body.getvalue()


def test_confluent_framing_uses_the_id_registered_for_the_subject() -> None:
    registry = mock_registry()
    codec = AvroCodec("raw_event", REPOSITORY, registry, "cdp.events.raw-value")
    data = codec.encode(EVENT)
    registered = registry.get_latest_version("cdp.events.raw-value")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == registered.schema_id == codec.schema_id
    assert json.loads(registered.schema.schema_str) == REPOSITORY.current("raw_event")
    assert data[5:] == AvroCodec("raw_event", REPOSITORY).encode(EVENT)[10:], "same body, different framing"
    assert AvroCodec("raw_event", REPOSITORY, registry).subject == "raw_event-value"


class CountingRegistry:
    """Delegates to a real (mock://) client and counts calls, to prove the hot path never calls it."""

    def __init__(self) -> None:
        self.inner, self.calls = mock_registry(), {"register_schema": 0, "get_schema": 0}

    def __getattr__(self, attribute: str) -> Any:
        if attribute in self.calls:
            self.calls[attribute] += 1
        return getattr(self.inner, attribute)


def test_registers_once_at_start_and_never_in_the_hot_path() -> None:
    registry = CountingRegistry()
    codec = AvroCodec("raw_event", REPOSITORY, registry, "cdp.events.raw-value")  # type: ignore[arg-type]
    for _ in range(50):
        assert codec.decode(codec.encode(EVENT)) == EVENT
    assert registry.calls == {"register_schema": 1, "get_schema": 0}


def test_reads_both_framings_whatever_it_writes() -> None:
    registry = mock_registry()
    plain, confluent = AvroCodec("raw_event", REPOSITORY), AvroCodec("raw_event", REPOSITORY, registry)
    assert confluent.decode(plain.encode(EVENT)) == EVENT
    other = AvroCodec("raw_event", REPOSITORY, registry)  # a fresh process: fetches the writer schema by id
    assert other.decode(confluent.encode(EVENT)) == EVENT


# --- the in-memory form -------------------------------------------------------------------------------------
def test_json_fields_are_objects_and_times_are_ints() -> None:
    decoded = AvroCodec("raw_event", REPOSITORY).decode(AvroCodec("raw_event", REPOSITORY).encode(EVENT))
    assert decoded == EVENT
    assert type(decoded["timestamp"]) is int and type(decoded["sent_at"]) is int
    assert decoded["properties"] == {"revenue": 12.5, "currency": "USD"}


def test_defaults_fill_missing_fields_and_the_input_is_not_changed() -> None:
    required = {k: EVENT[k] for k in ("message_id", "type", "source", "timestamp", "received_at")}
    before = dict(required)
    codec = AvroCodec("raw_event", REPOSITORY)
    decoded = codec.decode(codec.encode(required))
    assert required == before
    assert decoded["user_id"] is None and decoded["properties"] == {} and decoded["extra"] == {}


def test_a_value_that_does_not_fit_is_a_bad_event_naming_its_id() -> None:
    codec = AvroCodec("raw_event", REPOSITORY)
    with pytest.raises(BadEventError, match=r"cannot encode raw_event \(message_id=m-1"):
        codec.encode({**EVENT, "type": "purchase"})
    with pytest.raises(BadEventError, match="message_id=m-1"):
        codec.encode({k: v for k, v in EVENT.items() if k != "received_at"})


# --- evolution ----------------------------------------------------------------------------------------------
def older_raw_event() -> dict[str, Any]:
    """raw_event as it was before `extra` (a defaulted field) was added."""
    current = REPOSITORY.current("raw_event")
    return {**current, "fields": [f for f in current["fields"] if f["name"] != "extra"]}


@pytest.fixture
def evolved_repository(tmp_path: Path) -> SchemaRepository:
    """A schemas/ copy where the older raw_event is released as v1 and the current one as v2."""
    root = Path(shutil.copytree(Path(__file__).resolve().parents[2] / "schemas", tmp_path / "schemas"))
    (root / "history" / "raw_event.v1.avsc").write_text(json.dumps(older_raw_event()))
    shutil.copy(root / "raw_event.avsc", root / "history" / "raw_event.v2.avsc")
    return SchemaRepository.load(root)


def test_reads_single_object_data_written_with_an_older_version(evolved_repository: SchemaRepository) -> None:
    old_writer = AvroCodec("raw_event", SchemaRepository({"raw_event": older_raw_event()}, {}))
    old = {k: v for k, v in EVENT.items() if k != "extra"}
    assert AvroCodec("raw_event", evolved_repository).decode(old_writer.encode(old)) == {**old, "extra": {}}


def test_reads_confluent_data_written_with_an_older_version() -> None:
    registry = mock_registry()
    old_writer = AvroCodec("raw_event", SchemaRepository({"raw_event": older_raw_event()}, {}), registry)
    old = {k: v for k, v in EVENT.items() if k != "extra"}
    data = old_writer.encode(old)
    assert AvroCodec("raw_event", REPOSITORY, registry).decode(data) == {**old, "extra": {}}


def test_an_unreleased_version_is_an_unknown_fingerprint() -> None:
    data = AvroCodec("raw_event", SchemaRepository({"raw_event": older_raw_event()}, {})).encode(EVENT)
    with pytest.raises(UndecodableError, match=f"unknown schema fingerprint {data[2:10].hex()}"):
        AvroCodec("raw_event", REPOSITORY).decode(data)


# --- every way decoding fails -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty value"),
        (b'{"type":"track"}', r"unknown framing, first bytes 7b 22 74 79; expected c3 01"),
        (b"\xc3\x01\x00\x01", r"truncated single-object header \(4 bytes, need 10\)"),
        (b"\x00\x00\x01", r"truncated Confluent header"),
        (b"\x00\x00\x00\x00\x07rest", "Confluent-framed record \\(schema id 7\\) but no schema registry is configured"),
    ],
)
def test_undecodable_bytes_say_why(data: bytes, message: str) -> None:
    with pytest.raises(UndecodableError, match=message):
        AvroCodec("raw_event", REPOSITORY).decode(data)


def test_truncated_and_padded_bodies_are_undecodable() -> None:
    codec = AvroCodec("raw_event", REPOSITORY)
    data = codec.encode(EVENT)
    with pytest.raises(UndecodableError, match="Avro body does not decode"):
        codec.decode(data[:-20])
    with pytest.raises(UndecodableError, match="3 bytes left over after the record"):
        codec.decode(data + b"abc")


def test_another_payload_is_undecodable() -> None:
    dead = {"stage": "s", "reason": "r", "error": "E", "topic": "t", "partition": 0, "offset": 1, "failed_at": T0}
    with pytest.raises(UndecodableError, match="Avro body does not decode .*SchemaResolutionError"):
        AvroCodec("raw_event", REPOSITORY).decode(AvroCodec("dead_letter", REPOSITORY).encode(dead))


def test_an_unknown_registry_id_is_undecodable() -> None:
    codec = AvroCodec("raw_event", REPOSITORY, mock_registry())
    with pytest.raises(UndecodableError, match="schema id 4242 is not in the schema registry"):
        codec.decode(b"\x00" + (4242).to_bytes(4, "big") + b"\x00")


def test_a_json_field_that_is_not_json_is_undecodable_and_named() -> None:
    body = BytesIO()
    schema = fastavro.parse_schema(REPOSITORY.current("resolved_event"), named_schemas={})
    event = {**wire_form(EVENT), "properties": "{not json"}
    fastavro.schemaless_writer(body, schema, {"profile_id": "p-1", "identifiers": [], "event": event})
    codec = AvroCodec("resolved_event", REPOSITORY)
    with pytest.raises(UndecodableError, match=r"resolved_event \(profile_id=p-1\): field event.properties is not"):
        codec.decode(b"\xc3\x01" + codec.fingerprint + body.getvalue())


@settings(max_examples=400, deadline=None)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_damaged_bytes_decode_or_raise_undecodable_never_anything_else(cut: int, flips: list[tuple[int, int]]) -> None:
    codec = AvroCodec("resolved_event", REPOSITORY)
    data = bytearray(codec.encode({"profile_id": "p-1", "identifiers": [{"type": "t", "value": "v"}], "event": EVENT}))
    for position, byte in flips:
        data[position % len(data)] = byte
    try:
        codec.decode(bytes(data[: len(data) - cut % len(data)]))
    except UndecodableError:
        pass


# --- the repository -----------------------------------------------------------------------------------------
def test_repository_rejects_misnamed_history_and_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "history").mkdir(parents=True)
    (tmp_path / "raw_event.avsc").write_text(json.dumps(REPOSITORY.current("raw_event")))
    with pytest.raises(ConfigError, match="no schema 'raw_events'"):
        SchemaRepository.load(tmp_path).current("raw_events")
    (tmp_path / "history" / "raw_event-1.avsc").write_text("{}")
    with pytest.raises(ConfigError, match=r"named <schema>\.v<N>\.avsc"):
        SchemaRepository.load(tmp_path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=20), inner, max_size=40),
    max_leaves=60,
)


@settings(max_examples=100, deadline=None)
@given(record=st.dictionaries(st.text(max_size=30), json_values, max_size=10) | st.builds(lambda n: {"s": "x" * n}, st.integers(0, 300_000)))
def test_a_state_record_spliced_from_its_json_is_what_encode_writes(record: dict[str, Any]) -> None:
    for name in ("identity_state", "compute_state"):
        codec = AvroCodec(name, SchemaRepository.load())
        spliced = codec.encode_json_record(orjson.dumps(record))
        assert spliced == codec.encode({"record": record})
        assert codec.decode(spliced) == {"record": record}


def test_only_a_record_of_one_json_field_is_spliced() -> None:
    with pytest.raises(ConfigError, match="not a record of one json field"):
        AvroCodec("raw_event", SchemaRepository.load()).encode_json_record(b"{}")
