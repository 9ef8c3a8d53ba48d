"""Hypothesis strategies for values of an Avro schema, in the codec's in-memory form.

`strategy_for(schema)` draws values that are valid for any schema used in schemas/: records, enums, unions,
arrays, maps, fixed and every primitive. Logical types follow topology/codecs.py: `json` strings are drawn as
JSON objects (dicts), `timestamp-millis` longs as ints between 1970 and 2100. Values are chosen so that
equality survives a round trip: no NaN (NaN != NaN), no lone surrogates (not encodable as UTF-8), JSON
integers within 64 bits (orjson's range) and 32-bit floats for Avro `float`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

TIMESTAMP_MS_MAX = 4_102_444_800_000  # 2100-01-01T00:00:00Z

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values: SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
json_objects: SearchStrategy[dict[str, Any]] = st.dictionaries(text, json_values, max_size=6)

_PRIMITIVES: dict[str, SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "bytes": st.binary(max_size=48),
    "string": text,
}


def strategy_for(schema: Any) -> SearchStrategy[Any]:
    """Values valid for `schema` (parsed JSON of an .avsc), as the codec takes and returns them."""
    return _strategy(schema, "", {})


def _fullname(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _strategy(schema: Any, namespace: str, named: dict[str, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        fullname = _fullname(schema, namespace)
        # deferred: a record may refer to itself (or to a type defined later in the same parse)
        return st.deferred(lambda: named[fullname] if fullname in named else named[schema])
    if isinstance(schema, list):
        return st.one_of([_strategy(branch, namespace, named) for branch in schema])
    kind, logical = schema["type"], schema.get("logicalType")
    if kind == "string" and logical == "json":
        return json_objects
    if kind == "long" and logical == "timestamp-millis":
        return st.integers(0, TIMESTAMP_MS_MAX)
    if kind == "record":
        namespace = schema.get("namespace", namespace)
        fullname = _fullname(schema["name"], namespace)
        named[fullname] = st.nothing()  # placeholder while the fields are built
        fields = {f["name"]: _strategy(f["type"], namespace, named) for f in schema["fields"]}
        named[fullname] = strategy = st.fixed_dictionaries(fields)
        return strategy
    if kind == "enum":
        named[_fullname(schema["name"], schema.get("namespace", namespace))] = strategy = st.sampled_from(
            schema["symbols"]
        )
        return strategy
    if kind == "fixed":
        size = schema["size"]
        named[_fullname(schema["name"], schema.get("namespace", namespace))] = strategy = st.binary(
            min_size=size, max_size=size
        )
        return strategy
    if kind == "array":
        return st.lists(_strategy(schema["items"], namespace, named), max_size=4)
    if kind == "map":
        return st.dictionaries(text, _strategy(schema["values"], namespace, named), max_size=4)
    return _strategy(kind, namespace, named)  # {"type": "long"} and other wrapped primitives
