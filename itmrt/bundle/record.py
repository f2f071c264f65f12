"""JSON documents as typed dataclasses: every value's type checked on read, plain JSON written back.

A record is a ``@dataclass(kw_only=True)`` subclass of :class:`JsonRecord` whose
fields carry JSON-shaped annotations: ``str``, ``int``, ``float``, ``bool``,
``list[X]``, ``dict[str, X]``, another record, ``object`` (any JSON value) and
unions of these (``X | None``, ``int | str``). :meth:`JsonRecord.from_json`
checks a parsed document against the annotations and raises a one-line
:class:`RecordError` naming the first key whose value does not fit
(``'graphs.scorer.inputs[0].dtype' must be a string, not 3``), so a damaged
file is reported where it is damaged instead of failing later with a
``KeyError``.

The same annotations give the document's JSON Schema (:func:`json_schema`):
the schema file shipped for other tools is generated from the classes, never
written by hand, so the checks here and the schema cannot drift apart.

Keys a record does not know are kept and written back unchanged: documents
grow by additive entries (a newer itmrt may add one) without a new schema
version. Field ``metadata`` can add ``pattern`` (a regular expression a string,
or each key of a ``dict[str, X]`` with ``key_pattern``, must match; ``means``
says what it stands for in the message), ``choices`` (the strings a value, or
with ``key_choices`` a key, may be), ``minimum`` / ``maximum`` (bounds of a
number), ``values`` (the metadata of a ``dict[str, X]``'s values), ``const``
(the one value the key may hold), ``required=True`` (the key must be present
although the class has a default for new records) and ``omit=True`` (leave
the key out when its value is None or empty). Lists pass their metadata to
their items. JSON's lack of NaN and Infinity is kept: a non-finite number is
refused like a wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from itmrt.errors import ItmrtError

RecordT = TypeVar("RecordT", bound="JsonRecord")

SAFE_RELATIVE_PATH = r"^(?!/)(?![A-Za-z]:)(?!.*\\)(?!(.*/)?\.\.(/|$))(?!.*//).+$"
"""A relative path inside a folder: not absolute, no drive, no backslash, no ``..`` segment, no empty segment."""

SHA256_PATTERN = r"^[0-9a-f]{64}$"
"""A sha256 as every itmrt document records it: 64 lower-case hex digits."""

SHA256 = {"pattern": SHA256_PATTERN, "means": "a sha256 (64 lower-case hex digits)"}
"""Field metadata of a sha256 value."""


class RecordError(ItmrtError):
    """A JSON document whose value at ``path`` does not have the declared type."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"'{path}' {problem}" if path else problem)
        self.path = path
        self.problem = problem


def _describe(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict or (isinstance(hint, type) and issubclass(hint, JsonRecord)):
        return "an object"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    return "a JSON value"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./:+-]{1,64}")


def _join(path: str, key: str) -> str:
    """``path.key``; a key that is not plain text is shown as JSON (``path["a\\nb"]``), so the message
    stays one line whatever a hostile document holds."""
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key[:64])}]"
    return f"{path}.{key}" if path else key


def matches(pattern: str, value: str) -> bool:
    """Whether ``value`` matches a JSON Schema ``pattern`` as JSON Schema (ECMA-262) reads it: there ``$``
    is the end of the text, where Python's also matches before a final newline."""
    return re.search(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern, value) is not None


def _check_string(value: str, path: str, metadata: Mapping[str, object], prefix: str = "") -> None:
    """``value`` against the ``pattern`` / ``choices`` of ``metadata`` (``key_`` ones with ``prefix="key_"``)."""
    pattern, choices = metadata.get(f"{prefix}pattern"), metadata.get(f"{prefix}choices")
    if isinstance(pattern, str) and not matches(pattern, value):
        means = metadata.get(f"{prefix}means", "a relative path inside the folder")
        raise RecordError(path, f"is {_describe(value)}, which is not {means}")
    if isinstance(choices, (tuple, list)) and value not in choices:
        raise RecordError(path, f"is {_describe(value)}; it must be one of {', '.join(map(str, choices))}")


def _check_number(value: float, path: str, metadata: Mapping[str, object]) -> None:
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if isinstance(low, (int, float)) and value < low:
        raise RecordError(path, f"is {_describe(value)}; it must be at least {low}")
    if isinstance(high, (int, float)) and value > high:
        raise RecordError(path, f"is {_describe(value)}; it must be at most {high}")


def _convert(hint: Any, value: object, path: str, metadata: Mapping[str, object]) -> object:
    """``value`` checked against ``hint`` (records built, ints widened to float); RecordError on a mismatch."""
    origin = get_origin(hint)
    if hint is object or hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        present = [arg for arg in options if arg is not type(None)]
        if len(present) == 1:  # ``X | None``: X's own message names the deepest key
            return _convert(present[0], value, path, metadata)
        closest: RecordError | None = None
        for option in present:
            try:
                return _convert(option, value, path, metadata)
            except RecordError as exc:  # a value of the right type but out of range says so, not "must be"
                closest = closest or (exc if not exc.problem.startswith("must be") else None)
        raise closest or RecordError(path, f"must be {_type_name(hint)}, not {_describe(value)}")
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_json(value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(path, f"must be a list, not {_describe(value)}")
        (item,) = get_args(hint)
        return [_convert(item, entry, f"{path}[{index}]", metadata) for index, entry in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(path, f"must be an object, not {_describe(value)}")
        _key, item = get_args(hint)
        values = metadata.get("values")
        converted = {}
        for key, entry in value.items():
            _check_string(str(key), _join(path, str(key)), metadata, "key_")
            converted[key] = _convert(item, entry, _join(path, str(key)), values if isinstance(values, Mapping) else {})
        return converted
    return _convert_scalar(hint, value, path, metadata)


def _convert_scalar(hint: Any, value: object, path: str, metadata: Mapping[str, object]) -> object:
    integral = isinstance(value, float) and value.is_integer()  # JSON Schema's "integer" takes 2.0 too
    fits = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: (isinstance(value, int) and not isinstance(value, bool)) or integral,
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }
    if hint not in fits:
        raise TypeError(f"{hint!r} is not a JSON record type")
    if not fits[hint] or (isinstance(value, float) and not math.isfinite(value)):
        raise RecordError(path, f"must be {_type_name(hint)}, not {_describe(value)}")
    if hint is str:
        _check_string(str(value), path, metadata)
    elif hint in (int, float):
        _check_number(cast(float, value), path, metadata)
    if hint is float:
        return float(cast(float, value))
    if hint is int:
        return int(cast(float, value))
    return value


def _required(spec: dataclasses.Field[Any]) -> bool:
    no_default = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
    return no_default or bool(spec.metadata.get("required"))


_HINTS: dict[type, Mapping[str, Any]] = {}


def _hints(record: type) -> Mapping[str, Any]:
    """The record's resolved field annotations (resolved once per class)."""
    if record not in _HINTS:
        _HINTS[record] = get_type_hints(record)
    return _HINTS[record]


def _dump(value: object) -> object:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(entry) for entry in value]
    if isinstance(value, dict):
        return {key: _dump(entry) for key, entry in value.items()}
    return value


@dataclasses.dataclass(kw_only=True)
class JsonRecord:
    """Base of every typed JSON record; ``unknown_keys`` holds what this version does not know."""

    unknown_keys: dict[str, object] = dataclasses.field(default_factory=dict, repr=False, compare=False,
                                                         metadata={"internal": True})

    @classmethod
    def record_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def from_json(cls: type[RecordT], data: object, path: str = "") -> RecordT:
        """Build the record from parsed JSON, checking every value (one-line :class:`RecordError`)."""
        if not isinstance(data, dict):
            raise RecordError(path, f"must be an object, not {_describe(data)}")
        hints = _hints(cls)
        values: dict[str, object] = {}
        for spec in cls.record_fields():
            key = _join(path, spec.name)
            if spec.name not in data:
                if _required(spec):
                    raise RecordError(key, "is missing")
                continue
            values[spec.name] = _convert(hints[spec.name], data[spec.name], key, dict(spec.metadata))
            if "const" in spec.metadata and values[spec.name] != spec.metadata["const"]:
                expected = json.dumps(spec.metadata["const"])
                raise RecordError(key, f"must be {expected}, not {_describe(data[spec.name])}")
        known = {spec.name for spec in cls.record_fields()}
        record = cls(**values)  # type: ignore[arg-type]
        record.unknown_keys = {key: value for key, value in data.items() if key not in known}
        return record

    def to_json(self) -> dict[str, object]:
        """The record as plain JSON (fields in declaration order, then the unknown keys as read)."""
        out: dict[str, object] = {}
        for spec in self.record_fields():
            value = _dump(getattr(self, spec.name))
            if spec.metadata.get("omit") and value in (None, {}, []):
                continue
            out[spec.name] = value
        out.update({key: value for key, value in self.unknown_keys.items() if key not in out})
        return out


def parse_document(
    record: type[RecordT], data: object, source: str | Path, remedy: str,
    value_problem: Callable[[RecordT], RecordError | None],
) -> RecordT:
    """``data`` (a parsed JSON document) as ``record``, with the checks its schema cannot express
    (``value_problem``); any wrong value is one :class:`ItmrtError` line naming the file and the key."""
    try:
        parsed = record.from_json(data)
        problem = value_problem(parsed)
        if problem is not None:
            raise problem
    except RecordError as exc:
        raise ItmrtError(f"{source}: {exc}; {remedy}") from None
    return parsed

def optional(factory: Callable[[], object] | None = None, **metadata: object) -> Any:
    """A field that may be absent from the document: None (or ``factory()``), left out when empty."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"omit": True, **metadata})
    return dataclasses.field(default=None, metadata={"omit": True, **metadata})


def path_field(**metadata: object) -> Any:
    """A required string that names a file inside the bundle (checked to stay inside it)."""
    return dataclasses.field(metadata={"pattern": SAFE_RELATIVE_PATH, **metadata})


def sha256_field(**metadata: object) -> Any:
    """A required string that holds a sha256."""
    return dataclasses.field(metadata={**SHA256, **metadata})


def bounded(default: object = dataclasses.MISSING, minimum: float | None = None, maximum: float | None = None,
            **metadata: object) -> Any:
    """A number (or list of numbers) within ``minimum``..``maximum``; required unless it has a ``default``."""
    bounds = {key: value for key, value in (("minimum", minimum), ("maximum", maximum)) if value is not None}
    return dataclasses.field(default=default, metadata={**bounds, **metadata})


# -- JSON Schema ------------------------------------------------------------------


def json_schema(root: type[JsonRecord], title: str, schema_id: str) -> dict[str, object]:
    """The JSON Schema (draft 2020-12) of ``root``: what :meth:`JsonRecord.from_json` accepts."""
    definitions: dict[str, object] = {}
    body = _schema_of(root, definitions, {})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, "title": title,
            **body, "$defs": dict(sorted(definitions.items()))}  # type: ignore[dict-item]


def _schema_of(hint: Any, definitions: dict[str, object], metadata: Mapping[str, object]) -> dict[str, object]:
    origin = get_origin(hint)
    if hint is object or hint is Any:
        return {}
    scalars = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if hint in scalars:
        schema: dict[str, object] = {"type": scalars[hint]}
        if hint is str and metadata.get("pattern"):
            schema["pattern"] = metadata["pattern"]
        if hint is str and metadata.get("choices"):
            schema["enum"] = list(metadata["choices"])  # type: ignore[call-overload]
        for bound in ("minimum", "maximum"):
            if hint in (int, float) and metadata.get(bound) is not None:
                schema[bound] = metadata[bound]
        return schema
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(arg, definitions, metadata) for arg in get_args(hint)]}
    if origin is list:
        return {"type": "array", "items": _schema_of(get_args(hint)[0], definitions, metadata)}
    if origin is dict:
        values = metadata.get("values")
        items = _schema_of(get_args(hint)[1], definitions, values if isinstance(values, Mapping) else {})
        schema = {"type": "object", "additionalProperties": items}
        if metadata.get("key_pattern"):
            schema["propertyNames"] = {"pattern": metadata["key_pattern"]}
        if metadata.get("key_choices"):
            schema["propertyNames"] = {"enum": list(metadata["key_choices"])}  # type: ignore[call-overload]
        return schema
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return _record_schema(hint, definitions)
    raise TypeError(f"{hint!r} is not a JSON record type")


def _record_schema(record: type[JsonRecord], definitions: dict[str, object]) -> dict[str, object]:
    name = record.__name__
    if name not in definitions:
        definitions[name] = {}  # placeholder: a record may refer to itself
        hints = _hints(record)
        properties = {}
        for spec in record.record_fields():
            properties[spec.name] = _schema_of(hints[spec.name], definitions, dict(spec.metadata))
            if "const" in spec.metadata:
                properties[spec.name] = {**properties[spec.name], "const": spec.metadata["const"]}
        required = [spec.name for spec in record.record_fields() if _required(spec)]
        described: dict[str, object] = {"type": "object", "properties": properties, "required": required}
        if record.__doc__:
            described = {"description": " ".join(record.__doc__.split("\n\n")[0].split()), **described}
        definitions[name] = described
    return {"$ref": f"#/$defs/{name}"}
