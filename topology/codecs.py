"""The one Avro seam: payload dicts <-> the bytes of a topic value, for every topic.

Two framings, because two kinds of deployment exist:

* **Avro single-object encoding** (no registry, the default): `C3 01`, the 8-byte little-endian CRC-64-AVRO
  fingerprint of the writer schema's Parsing Canonical Form, then the binary body (Avro spec, "Single object
  encoding"). The bytes name their schema by content, and every released version lives in schemas/, so the
  pipeline needs no extra service and a record stays readable for as long as its version is kept.
* **Confluent wire format** (`CDP_SCHEMA_REGISTRY_URL` set): `00`, the 4-byte big-endian schema id, then the
  body. This is what Kafka Connect, ksqlDB and every Confluent deserializer expect on a topic.

The reader accepts both whatever the codec writes, so turning the registry on or off needs no migration: old
records keep decoding. Either way the writer schema is resolved to the current one (Avro schema resolution),
so a field added with a default appears with that default in records written before it existed.

In memory, fields of `logicalType: json` are Python objects (orjson both ways) and timestamps are plain int
epoch milliseconds. fastavro never sees a logical type: they are stripped from the copy it is given (Parsing
Canonical Form drops them too, so fingerprints don't change). That keeps datetimes out of the stages and
leaves fastavro's process-wide logical-type registry untouched. Schema parsing, fingerprints and the
registry happen once per codec, at start; `encode` and `decode` only frame bytes and call fastavro.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form

from agents.errors import BadEventError, ConfigError, DeliveryFailed, UndecodableError

from topology.config import Settings
from topology.topics import TopicSpec

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_HISTORY_FILE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")
# What fastavro raises on bytes that don't fit the writer schema (truncation, bad lengths, bad UTF-8, enum or
# union index out of range, unresolvable writer/reader pair); all mean "these bytes are not this payload".
_BODY_ERRORS = (EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError, SchemaResolutionError)
_ENCODE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, OverflowError)
_Resolution = tuple[dict[str, Any], dict[str, Any] | None]  # (writer schema, reader schema or None if the same)


def crc64_avro_fingerprint(schema: dict[str, Any] | str) -> bytes:
    """The 8 bytes that follow `C3 01`: CRC-64-AVRO of the Parsing Canonical Form, little-endian."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


class SchemaRepository:
    """All schema versions in schemas/ (current + history), parsed, indexed by name and by CRC-64-AVRO fingerprint.

    `schemas/<name>.avsc` is the current version of a payload; `schemas/history/<name>.v<N>.avsc` are the
    released versions, frozen. A record written with any of them can be read.
    """

    def __init__(self, current: Mapping[str, dict[str, Any]], history: Mapping[str, list[dict[str, Any]]]) -> None:
        self._current = dict(current)
        self._history = {name: list(versions) for name, versions in history.items()}
        self._by_fingerprint: dict[bytes, dict[str, Any]] = {}
        for schema in [*self._current.values(), *(s for versions in self._history.values() for s in versions)]:
            self._by_fingerprint.setdefault(crc64_avro_fingerprint(schema), schema)

    @classmethod
    def load(cls, root: Path | None = None) -> SchemaRepository:
        """Read `root` (default: the repository's schemas/); a file that doesn't parse is a ConfigError."""
        root = root or Path(__file__).resolve().parent.parent / "schemas"
        if not root.is_dir():
            raise ConfigError(f"schema directory {root} does not exist")
        current = {path.stem: _read_schema(path) for path in sorted(root.glob("*.avsc"))}
        numbered: dict[str, dict[int, dict[str, Any]]] = {}
        for path in sorted((root / "history").glob("*.avsc")):
            match = _HISTORY_FILE.match(path.name)
            if match is None:
                raise ConfigError(f"{path}: a history file is named <schema>.v<N>.avsc, e.g. raw_event.v1.avsc")
            numbered.setdefault(match["name"], {})[int(match["version"])] = _read_schema(path)
        history = {name: [versions[n] for n in sorted(versions)] for name, versions in numbered.items()}
        return cls(current, history)

    def names(self) -> list[str]:
        """Names of the current schemas (file stems: raw_event, dead_letter, ...)."""
        return sorted(self._current)

    def current(self, name: str) -> dict[str, Any]:
        """The current schema of `name`, as parsed JSON."""
        try:
            return self._current[name]
        except KeyError:
            raise ConfigError(f"no schema {name!r} in schemas/ (known: {', '.join(self.names())})") from None

    def history(self, name: str) -> list[dict[str, Any]]:
        """The released versions of `name`, oldest (v1) first."""
        return list(self._history.get(name, []))

    def by_fingerprint(self, fp: bytes) -> dict[str, Any] | None:
        """The schema version whose fingerprint is `fp`, or None."""
        return self._by_fingerprint.get(fp)


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        parse_schema(schema, named_schemas={})
    except (OSError, ValueError, TypeError, KeyError) as exc:  # fastavro's SchemaParseException is a ValueError
        raise ConfigError(f"{path}: not a valid Avro schema: {exc}") from exc
    return schema


class AvroCodec:
    """Encodes and decodes one payload type (e.g. 'raw_event') for one topic.

    Writes single-object framing, or Confluent framing when given a registry; reads both. Not thread-safe
    for its caches, which is fine: one codec serves one event loop.
    """

    def __init__(
        self,
        name: str,
        repository: SchemaRepository,
        registry: SchemaRegistryClient | None = None,
        subject: str | None = None,
    ) -> None:
        self.name, self.subject = name, subject or f"{name}-value"
        self._repository = repository
        schema = repository.current(name)
        self._reader = _parsed(schema)
        self._to_wire, self._from_wire = _converters(schema, "", {}) or (None, None)
        fields = schema.get("fields", []) if isinstance(schema, dict) else []
        self._one_json_field = len(fields) == 1 and fields[0]["type"] == {"type": "string", "logicalType": "json"}
        self.fingerprint = crc64_avro_fingerprint(schema)
        # writer fingerprint or registry id -> (fastavro writer schema, reader schema or None when identical)
        self._by_fingerprint: dict[bytes, _Resolution] = {self.fingerprint: (self._reader, None)}
        self._by_id: dict[int, _Resolution] = {}
        self._registry = registry
        self.schema_id: int | None = None
        if registry is None:
            self._header = SINGLE_OBJECT_MAGIC + self.fingerprint
        else:
            self.schema_id = _register(registry, self.subject, schema)
            self._by_id[self.schema_id] = (self._reader, None)
            self._header = CONFLUENT_MAGIC + self.schema_id.to_bytes(4, "big")

    def encode_json_record(self, json: bytes) -> bytes:
        """The framed bytes of a record whose one field is a json string, from that JSON as it is: the same bytes
        `encode({field: orjson.loads(json)})` gives, without parsing and re-serialising it (state changelogs)."""
        if not self._one_json_field:
            raise ConfigError(f"{self.name} is not a record of one json field")
        size, length = len(json), bytearray()
        zigzag = size << 1  # Avro strings: a zig-zag varint length, then the UTF-8 bytes
        while zigzag > 0x7F:
            length.append((zigzag & 0x7F) | 0x80)
            zigzag >>= 7
        length.append(zigzag)
        return self._header + bytes(length) + json

    def encode(self, value: Mapping[str, Any]) -> bytes:
        """The framed bytes of `value`; BadEventError when it doesn't fit the schema (a field missing or mistyped)."""
        out = BytesIO()
        out.write(self._header)
        try:
            schemaless_writer(out, self._reader, self._to_wire(value) if self._to_wire else value)
        except _ENCODE_ERRORS as exc:
            raise BadEventError(f"cannot encode {self.name}{_ids(value)}: {exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """The payload dict in `data`, in the current schema's shape; UndecodableError saying why it can't be read."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            start = 10
            writer, reader = self._by_fingerprint.get(data[2:10]) or self._writer_by_fingerprint(data)
        elif data[:1] == CONFLUENT_MAGIC:
            start = 5
            schema_id = int.from_bytes(data[1:5], "big")
            writer, reader = self._by_id.get(schema_id) or self._writer_by_id(data, schema_id)
        elif not data:
            raise UndecodableError(f"{self.name}: empty value (a tombstone?), expected an Avro record")
        else:
            raise UndecodableError(
                f"{self.name}: unknown framing, first bytes {bytes(data[:4]).hex(' ')}; "
                "expected c3 01 (Avro single-object) or 00 (Confluent wire format)"
            )
        buf = BytesIO(data)
        buf.seek(start)
        try:
            record = schemaless_reader(buf, writer, reader)
        except _BODY_ERRORS as exc:
            raise UndecodableError(
                f"{self.name}: Avro body does not decode (corrupt, truncated or another payload): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if buf.tell() != len(data):
            raise UndecodableError(f"{self.name}: {len(data) - buf.tell()} bytes left over after the record")
        if self._from_wire is None:
            return record
        try:
            return self._from_wire(record)
        except _JsonFieldError as exc:
            reason = f"field {exc.path} is not valid JSON: {exc.reason}"
            raise UndecodableError(f"{self.name}{_ids(record)}: {reason}") from None

    def _writer_by_fingerprint(self, data: bytes) -> _Resolution:
        """First record of an older (or newer, but known) schema version: parse it once and remember it."""
        if len(data) < 10:
            raise UndecodableError(f"{self.name}: truncated single-object header ({len(data)} bytes, need 10)")
        fp = bytes(data[2:10])
        schema = self._repository.by_fingerprint(fp)
        if schema is None:
            raise UndecodableError(
                f"{self.name}: unknown schema fingerprint {fp.hex()} (not any version in schemas/ or schemas/history/)"
            )
        self._by_fingerprint[fp] = entry = (_parsed(schema), self._reader)
        return entry

    def _writer_by_id(self, data: bytes, schema_id: int) -> _Resolution:
        """First record with this registry id: fetch the writer schema once and remember it."""
        if len(data) < 5:
            raise UndecodableError(f"{self.name}: truncated Confluent header ({len(data)} bytes, need 5)")
        if self._registry is None:
            raise UndecodableError(
                f"{self.name}: Confluent-framed record (schema id {schema_id}) but no schema registry is configured "
                "(set CDP_SCHEMA_REGISTRY_URL)"
            )
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            registered = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UndecodableError(f"{self.name}: schema id {schema_id} is not in the schema registry") from None
            raise DeliveryFailed(f"the schema registry failed to give schema id {schema_id}: {exc}") from exc
        except Exception as exc:  # unreachable: not this record's fault, so retried (DeliveryFailed), never dead-lettered
            raise DeliveryFailed(f"the schema registry did not answer for schema id {schema_id}: {exc}") from exc
        try:
            schema = json.loads(registered.schema_str or "")
            writer = _parsed(schema)
        except (ValueError, TypeError, KeyError) as exc:  # not JSON, or JSON that isn't an Avro schema
            raise UndecodableError(f"{self.name}: schema id {schema_id} is not an Avro schema: {exc}") from None
        same = crc64_avro_fingerprint(schema) == self.fingerprint
        self._by_id[schema_id] = entry = (writer, None if same else self._reader)
        return entry


def _register(registry: SchemaRegistryClient, subject: str, schema: dict[str, Any]) -> int:
    """Register the current schema under `subject` once, at start; a refusal stops the process (ConfigError)."""
    from confluent_kafka.schema_registry import Schema

    try:
        return registry.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
    except Exception as exc:  # network, auth or compatibility: all mean this process can't write the topic
        raise ConfigError(f"schema registry refused {schema.get('name')} under subject {subject!r}: {exc}") from exc


def _ids(value: Mapping[str, Any]) -> str:
    """' (message_id=..., ...)' for error messages: the ids a reader needs to find the record."""
    if not isinstance(value, Mapping):
        return ""
    found = [f"{k}={v}" for k, v in value.items() if (k.endswith("_id") or k == "key") and isinstance(v, str)]
    return f" ({', '.join(found)})" if found else ""


def _parsed(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as fastavro wants it: logical types removed (see the module docstring), parsed once."""
    return parse_schema(_strip_logical_types(schema), named_schemas={})


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip_logical_types(branch) for branch in node]
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k != "logicalType"}
    for key in ("type", "items", "values"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = _strip_logical_types(out[key])
    if "fields" in out:
        out["fields"] = [{**f, "type": _strip_logical_types(f["type"])} for f in out["fields"]]
    if set(out) == {"type"} and isinstance(out["type"], str):
        return out["type"]  # {"type": "long"} -> "long", so fastavro takes its fastest path
    return out


# --- logicalType json <-> Python objects -------------------------------------------------------------------
Converter = Callable[[Any], Any]
Converters = tuple[Converter, Converter]  # (to_wire: copies, never changes the caller's dict; from_wire: in place)
_BUILDING: Any = object()  # marks a record whose converters are being built, to catch recursive references


class _JsonFieldError(Exception):
    """A json field that isn't JSON; carries the dotted path to it so the message can name it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _JsonFieldError("", str(exc)) from None


def _fullname(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _converters(node: Any, namespace: str, named: dict[str, Any]) -> Converters | None:
    """Converters for the json fields in `node`, or None when it has none (then no copy or walk is needed)."""
    if isinstance(node, str):
        found = named.get(_fullname(node, namespace), named.get(node))
        if found is _BUILDING:
            raise ConfigError(f"record {node} refers to itself; the codec does not support recursive records")
        return found
    if isinstance(node, list):
        return _union(node, namespace, named)
    kind = node["type"]
    if kind == "string" and node.get("logicalType") == "json":
        return _dumps, _loads
    if kind == "record":
        return _record(node, namespace, named)
    if kind in ("array", "map"):
        inner = _converters(node["items" if kind == "array" else "values"], namespace, named)
        if inner is None:
            return None
        to_inner, from_inner = inner
        if kind == "array":
            return (lambda v: [to_inner(x) for x in v]), (lambda v: [from_inner(x) for x in v])
        return (lambda v: {k: to_inner(x) for k, x in v.items()}), (lambda v: {k: from_inner(x) for k, x in v.items()})
    return _converters(kind, namespace, named) if isinstance(kind, (dict, list)) else None  # primitives, enum, fixed


def _union(branches: list[Any], namespace: str, named: dict[str, Any]) -> Converters | None:
    converting = [c for c in (_converters(b, namespace, named) for b in branches) if c is not None]
    if not converting:
        return None
    if len([b for b in branches if b != "null"]) > 1:
        # fastavro gives no branch tag, so a union of json with another non-null type would be ambiguous.
        raise ConfigError(f"union {branches} mixes json with other types; only null may share a union with it")
    to_wire, from_wire = converting[0]
    return (lambda v: None if v is None else to_wire(v)), (lambda v: None if v is None else from_wire(v))


def _record(node: dict[str, Any], namespace: str, named: dict[str, Any]) -> Converters | None:
    namespace = node.get("namespace", namespace)
    fullname = _fullname(node["name"], namespace)
    named[fullname] = _BUILDING
    fields = [(f["name"], c) for f in node["fields"] if (c := _converters(f["type"], namespace, named))]
    named[fullname] = None
    if not fields:
        return None
    to_fields = [(name, to_wire) for name, (to_wire, _) in fields]
    from_fields = [(name, from_wire) for name, (_, from_wire) in fields]

    def to_wire(value: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(value)
        for name, convert in to_fields:
            if name in out:  # absent: fastavro writes the schema default, already JSON text
                out[name] = convert(out[name])
        return out

    def from_wire(record: dict[str, Any]) -> dict[str, Any]:
        for name, convert in from_fields:
            try:
                record[name] = convert(record[name])
            except _JsonFieldError as exc:
                raise _JsonFieldError(f"{name}.{exc.path}".rstrip("."), exc.reason) from None
        return record

    named[fullname] = (to_wire, from_wire)
    return to_wire, from_wire


@dataclass
class Codecs:
    """One codec per topic, registered under `<topic>-value` when a schema registry is configured."""

    settings: Settings
    repository: SchemaRepository = field(default_factory=SchemaRepository.load)
    _cache: dict[str, AvroCodec] = field(default_factory=dict)

    def for_topic(self, spec: TopicSpec) -> AvroCodec:
        name = spec.name(self.settings)
        if name not in self._cache:
            registry = schema_registry(self.settings.schema_registry_url)
            self._cache[name] = AvroCodec(spec.schema, self.repository, registry=registry, subject=f"{name}-value")
        return self._cache[name]


def schema_registry(url: str | None) -> Any:
    """A Schema Registry client for `url` (`mock://...` gives confluent-kafka's in-process mock), or None."""
    if not url:
        return None
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})
