"""Default size bounds for constrained JSON: a forced call or structured reply closes on any model.

A JSON Schema that leaves sizes open (``{"type": "integer"}``, a string without ``maxLength``, an
array without ``maxItems``, an object that takes any key) lets a model fill it for as long as it
likes: the random tiny model writes ``1111...`` until ``max_tokens`` and the call never parses.
``bound_schema`` returns a copy with llguidance-honoured keywords added where the schema gives
none (the ``DEFAULT_*`` constants below). Every value the copy accepts is accepted by the
original, so a reply still validates against the caller's schema; a bound the schema states
itself wins, and a default never contradicts one (``minLength: 100`` lifts ``maxLength`` to 100).

Defaults, per value:

- string: ``maxLength`` 64 characters (``enum``/``const`` are left alone);
- integer: ``minimum``/``maximum`` +-999,999,999 (at most 9 digits);
- number: the same range and ``multipleOf`` 1e-6 (at most 6 decimals);
- array: ``maxItems`` 8;
- object with declared ``properties``: closed (``additionalProperties: false``, OpenAI strict
  mode's rule), since llguidance cannot bound the count of extra keys next to optional ones;
- free-form object (no ``properties``): keys of at most 32 characters, at most 8 of them
  (``patternProperties`` + ``maxProperties``), values per its bounded ``additionalProperties``
  schema, else as in the next item;
- a value of any type (``{}``, ``true``): a bounded string, number, boolean or null. Nested
  free-form structure needs a schema that declares it.

Long text belongs in a schema that says so: ``{"type": "string", "maxLength": 2000}``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bound_schema", "DEFAULT_MAX_LENGTH", "DEFAULT_MAX_INTEGER", "DEFAULT_NUMBER_STEP",
           "DEFAULT_MAX_ITEMS", "DEFAULT_MAX_PROPERTIES", "DEFAULT_KEY_LENGTH"]

DEFAULT_MAX_LENGTH = 64
DEFAULT_MAX_INTEGER = 999_999_999
DEFAULT_NUMBER_STEP = 1e-6
DEFAULT_MAX_ITEMS = 8
DEFAULT_MAX_PROPERTIES = 8
DEFAULT_KEY_LENGTH = 32

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")
_STRUCTURE = {"type", "enum", "const", "$ref", "not", *_SCHEMA_MAPS, *_SCHEMA_LISTS,
              *_SCHEMA_VALUES}
"""Keywords that say what a value is; a schema with none of them accepts any value."""


def _scalar() -> dict[str, Any]:
    """A bounded value of any type (a fresh copy: callers may add keywords)."""
    return {"anyOf": [{"type": "string", "maxLength": DEFAULT_MAX_LENGTH},
                      {"type": "number", "minimum": -DEFAULT_MAX_INTEGER,
                       "maximum": DEFAULT_MAX_INTEGER, "multipleOf": DEFAULT_NUMBER_STEP},
                      {"type": "boolean"}, {"type": "null"}]}


def bound_schema(schema: Any) -> Any:
    """A copy of ``schema`` whose every open size has a default bound (see the module doc)."""
    if schema is True:
        return _scalar()
    if not isinstance(schema, dict):
        return schema
    out = {key: _bound_child(key, value) for key, value in schema.items()}
    if not _STRUCTURE & out.keys():
        return {**out, **_scalar()}
    if "enum" in out or "const" in out:
        return out
    types = _types(out)
    if "string" in types and "maxLength" not in out:
        out["maxLength"] = max(DEFAULT_MAX_LENGTH, out.get("minLength", 0))
    if types & {"integer", "number"}:
        _bound_range(out)
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = DEFAULT_NUMBER_STEP
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(DEFAULT_MAX_ITEMS, out.get("minItems", 0),
                              len(out.get("prefixItems", [])))
    if "object" in types:
        _bound_object(out)
    return out


def _bound_child(key: str, value: Any) -> Any:
    """Subschemas are bounded too; ``not`` (and every other keyword) is kept as written."""
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return {name: bound_schema(sub) for name, sub in value.items()}
    if key in _SCHEMA_LISTS and isinstance(value, list):
        return [bound_schema(sub) for sub in value]
    if key in _SCHEMA_VALUES:
        return [bound_schema(s) for s in value] if isinstance(value, list) else bound_schema(value)
    return value


def _types(schema: dict[str, Any]) -> set[str]:
    """The schema's types, inferred from its keywords when it has no ``type``."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    if "properties" in schema or "additionalProperties" in schema:
        return {"object"}
    if "items" in schema or "prefixItems" in schema:
        return {"array"}
    return set()


def _number(value: Any) -> float | None:
    """A numeric bound (draft-4's boolean ``exclusiveMinimum`` is not one)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _bound_range(schema: dict[str, Any]) -> None:
    """Add the missing side(s) of +-``DEFAULT_MAX_INTEGER``, never crossing a stated bound."""
    low = _number(schema.get("minimum"))
    low = low if low is not None else _number(schema.get("exclusiveMinimum"))
    high = _number(schema.get("maximum"))
    high = high if high is not None else _number(schema.get("exclusiveMaximum"))
    if high is None:
        schema["maximum"] = max(DEFAULT_MAX_INTEGER, low if low is not None else 0)
    if low is None:
        schema["minimum"] = min(-DEFAULT_MAX_INTEGER, high if high is not None else 0)


def _bound_object(schema: dict[str, Any]) -> None:
    """Close an object with declared properties; give a free-form one bounded keys and count."""
    extra = schema.get("additionalProperties", True)
    if "patternProperties" in schema or extra is False:
        return
    declared = schema.get("properties")
    if isinstance(declared, dict):
        if set(schema.get("required", [])) <= declared.keys():
            schema["additionalProperties"] = False
        return
    key = f"^.{{1,{DEFAULT_KEY_LENGTH}}}$"
    schema["patternProperties"] = {key: extra if isinstance(extra, dict) else _scalar()}
    schema["additionalProperties"] = False
    schema.setdefault("maxProperties", max(DEFAULT_MAX_PROPERTIES,
                                           schema.get("minProperties", 0)))
