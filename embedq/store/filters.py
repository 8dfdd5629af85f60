"""The metadata filter language (``where`` of search): parsed and checked here, before any
database sees it, and compiled to the same meaning on SQLite and Postgres.

A filter is a JSON object; every entry must hold (an implicit AND)::

    {"lang": "en"}                          equal, by JSON value and type
    {"n": {"$gte": 2, "$lt": 5}}            numbers compared (every operator must hold)
    {"tag": {"$in": ["a", "b"]}}            equal to one of the list
    {"draft": {"$exists": false}}           the key is absent
    {"$or": [{"lang": "en"}, {"lang": "de"}]}

Equality is JSON's: same type and value; numbers by value (``3`` equals ``3.0``), ``true``
never equals ``1``; objects by their keys and values in any order, arrays element by element
in order. ``null`` matches a key present with the value null, never a missing key. ``$ne``
and ``$nin`` are the negations of ``$eq`` and ``$in``, so they match a missing key too.
An object whose keys start with ``$`` is an operator object; to compare with such an
object literally, use ``{"$eq": {...}}``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, and_, cast, false, func, literal, not_, or_, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from embedq.errors import InvalidFilterError

MAX_CONDITIONS = 64
MAX_LIST_VALUES = 1000
MAX_KEY_CHARS = 256
MAX_DEPTH = 32
MAX_BYTES = 64 * 1024
# Numbers are bound as SQLite 64-bit integers or doubles: larger ones cannot be compared.
NUMBER_MIN, NUMBER_MAX = -(2**63), 2**63 - 1

COMPARISONS = ("$gt", "$gte", "$lt", "$lte")
OPERATORS = ("$eq", "$ne", "$in", "$nin", *COMPARISONS, "$exists")
COMBINATORS = ("$and", "$or")
NUMBER_TYPES = ("integer", "real")


@dataclass(frozen=True)
class Condition:
    """One operator applied to one metadata key (``$eq`` for a plain value)."""

    key: str
    op: str
    value: Any


@dataclass(frozen=True)
class Group:
    """Parts that must all hold (``all_of``) or of which one must."""

    parts: tuple[Node, ...]
    all_of: bool = True


Node = Condition | Group


@dataclass(frozen=True)
class Filter:
    """A parsed, checked ``where``: compile it with :func:`to_sql`, or test a metadata
    dict in Python with :meth:`matches` (the same meaning)."""

    root: Group

    def matches(self, metadata: dict[str, Any]) -> bool:
        """Whether ``metadata`` passes this filter."""
        return _holds(self.root, metadata)


def parse_where(where: Any) -> Filter | None:
    """``where`` checked and parsed; None for no filter (None or ``{}``). Raises
    :class:`InvalidFilterError` naming the first problem."""
    if isinstance(where, Filter):
        return where
    if where is None:
        return None
    if not isinstance(where, dict):
        raise InvalidFilterError(f"where must be a JSON object, got {type(where).__name__}")
    _check_document(where)
    # Through JSON once: tuples become lists, as the stores will see them.
    root = _parse_object(json.loads(json.dumps(where)), "where")
    counts = _counts(root)
    if counts[0] > MAX_CONDITIONS:
        raise InvalidFilterError(f"where holds {counts[0]} conditions; at most {MAX_CONDITIONS}")
    if counts[1] > MAX_LIST_VALUES:
        raise InvalidFilterError(
            f"where lists {counts[1]} values in $in/$nin; at most {MAX_LIST_VALUES} in all"
        )
    return Filter(root) if root.parts else None


def _check_document(where: dict[str, Any]) -> None:
    """Limits of the whole document: depth, every key and value, size as JSON."""
    stack: list[tuple[Any, int, str]] = [(where, 1, "where")]
    while stack:
        node, level, path = stack.pop()
        if level > MAX_DEPTH:
            raise InvalidFilterError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_key(key, path)
                stack.append((value, level + 1, f"{path}[{json.dumps(key)}]"))
        elif isinstance(node, list | tuple):
            stack.extend((v, level + 1, f"{path}[{i}]") for i, v in enumerate(node))
        else:
            _check_scalar(node, path)
    size = len(json.dumps(where, ensure_ascii=False).encode("utf-8"))
    if size > MAX_BYTES:
        raise InvalidFilterError(f"where is {size} bytes as JSON; at most {MAX_BYTES}")


def _check_key(key: Any, path: str) -> None:
    if not isinstance(key, str):
        raise InvalidFilterError(f"{path}: keys must be strings, got {type(key).__name__}")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidFilterError(f"{path}: a key of {len(key)} characters; at most {MAX_KEY_CHARS}")
    _check_text(key, f"{path}: a key")


def _check_scalar(value: Any, path: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, f"{path}:")
    elif isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidFilterError(f"{path}: {value} is not a JSON number")
        if not NUMBER_MIN <= value <= NUMBER_MAX:
            raise InvalidFilterError(
                f"{path}: {value} is outside the numbers a filter compares (-2**63 to "
                "2**63-1); store and filter it as a string"
            )
    else:
        raise InvalidFilterError(f"{path}: {type(value).__name__} is not a JSON value")


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise InvalidFilterError(f"{what} holds a NUL character, which no store keeps")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidFilterError(f"{what} holds a lone surrogate (not valid Unicode)") from None


def _parse_object(where: Any, path: str) -> Group:
    """One filter object: its entries, all of which must hold."""
    if not isinstance(where, dict):
        raise InvalidFilterError(f"{path} must be a JSON object, got {type(where).__name__}")
    parts: list[Node] = []
    for key, value in where.items():
        here = f"{path}[{json.dumps(key)}]"
        if key in COMBINATORS:
            parts.append(_parse_combinator(key, value, here))
        elif key.startswith("$"):
            raise InvalidFilterError(
                f"{here}: unknown operator {key!r} here; a filter's keys are metadata keys, "
                "$and or $or (metadata keys starting with $ cannot be filtered)"
            )
        else:
            parts.extend(_parse_conditions(key, value, here))
    return Group(tuple(parts))


def _parse_combinator(name: str, value: Any, path: str) -> Group:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CONDITIONS:
        raise InvalidFilterError(
            f"{path}: {name} takes a list of 1 to {MAX_CONDITIONS} filter objects"
        )
    parts = tuple(_parse_object(item, f"{path}[{i}]") for i, item in enumerate(value))
    return Group(parts, all_of=name == "$and")


def _parse_conditions(key: str, value: Any, path: str) -> list[Condition]:
    """A key's conditions: one ``$eq`` for a plain value, else one per operator."""
    if not _is_operator_object(value):
        return [Condition(key, "$eq", value)]
    if not all(op.startswith("$") for op in value):
        raise InvalidFilterError(
            f"{path}: mixes operators and plain keys; compare with an object literally "
            'through {"$eq": {...}}'
        )
    return [
        _parse_operator(key, op, operand, f"{path}[{json.dumps(op)}]")
        for op, operand in value.items()
    ]


def _is_operator_object(value: Any) -> bool:
    return isinstance(value, dict) and any(k.startswith("$") for k in value)


def _parse_operator(key: str, op: str, operand: Any, path: str) -> Condition:
    if op not in OPERATORS:
        raise InvalidFilterError(f"{path}: unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    if op in COMPARISONS and not _is_number(operand):
        raise InvalidFilterError(f"{path}: {op} compares numbers, got {_kind(operand)}")
    if op in ("$in", "$nin") and not isinstance(operand, list):
        raise InvalidFilterError(f"{path}: {op} takes a list of values, got {_kind(operand)}")
    if op == "$exists" and not isinstance(operand, bool):
        raise InvalidFilterError(f"{path}: $exists takes true or false, got {_kind(operand)}")
    return Condition(key, op, operand)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), "a number")


def _counts(node: Node) -> tuple[int, int]:
    """(conditions, values in $in/$nin lists) of a parsed filter."""
    if isinstance(node, Condition):
        return 1, len(node.value) if node.op in ("$in", "$nin") else 0
    totals = [_counts(part) for part in node.parts]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


# --- The meaning, in Python -------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: same type and value; numbers by value, booleans apart from numbers,
    objects in any key order, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _holds(node: Node, metadata: dict[str, Any]) -> bool:
    if isinstance(node, Group):
        results = (_holds(part, metadata) for part in node.parts)
        return all(results) if node.all_of else any(results)
    present, value = node.key in metadata, metadata.get(node.key)
    if node.op == "$exists":
        return present == node.value
    if node.op in ("$ne", "$nin"):
        listed = [node.value] if node.op == "$ne" else node.value
        return not (present and any(json_equal(value, v) for v in listed))
    if node.op in ("$eq", "$in"):
        listed = [node.value] if node.op == "$eq" else node.value
        return present and any(json_equal(value, v) for v in listed)
    return present and _is_number(value) and _COMPARE[node.op](value, node.value)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


# --- The meaning, in SQL -----------------------------------------------------------------


def to_sql(node: Node, column: Any, dialect: str) -> ColumnElement[bool]:
    """``node`` as a SQL condition on the JSON ``column`` (never NULL, so it negates
    safely): EXISTS over ``json_each`` on SQLite, ``->`` and jsonb equality on Postgres."""
    if isinstance(node, Group):
        parts = [to_sql(part, column, dialect) for part in node.parts]
        # An empty group is what all([]) and any([]) say: true for $and, false for $or.
        return and_(true(), *parts) if node.all_of else or_(false(), *parts)
    leaf = _postgres if dialect == "postgresql" else _sqlite
    if node.op in ("$ne", "$nin"):
        positive = Condition(node.key, "$eq" if node.op == "$ne" else "$in", node.value)
        return not_(leaf(positive, column))
    return leaf(node, column)


def _values(node: Condition) -> str:
    """The JSON array of values a ``$eq``/``$in`` compares with."""
    return json.dumps([node.value] if node.op == "$eq" else node.value)


def _postgres(node: Condition, column: Any) -> ColumnElement[bool]:
    value = column.op("->", return_type=JSONB)(cast(literal(node.key, Text), Text))
    if node.op == "$exists":
        return value.is_not(None) if node.value else value.is_(None)
    if node.op in ("$eq", "$in"):
        listed = select(func.jsonb_array_elements(cast(literal(_values(node), Text), JSONB)))
        return func.coalesce(value.in_(listed), false())
    bound = cast(literal(json.dumps(node.value), Text), JSONB)
    is_number = func.jsonb_typeof(value) == "number"
    compared = value.op(_SQL_OPS[node.op], is_comparison=True)(bound)
    return func.coalesce(and_(is_number, compared), false())


_SQL_OPS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _sqlite(node: Condition, column: Any) -> ColumnElement[bool]:
    entry = func.json_each(column).table_valued("key", "value", "type", "atom").alias()
    found = select(literal(1)).select_from(entry).where(entry.c.key == node.key)
    if node.op == "$exists":
        return found.exists() if node.value else not_(found.exists())
    if node.op in ("$eq", "$in"):
        return found.where(_sqlite_member(entry, _values(node))).exists()
    compared = entry.c.atom.op(_SQL_OPS[node.op], is_comparison=True)(node.value)
    return found.where(entry.c.type.in_(NUMBER_TYPES), compared).exists()


def _sqlite_member(entry: Any, values: str) -> ColumnElement[bool]:
    """``entry`` (a json_each row) equals one of the JSON array ``values``, as JSON says."""
    listed = func.json_each(literal(values, Text)).table_valued("value", "type", "atom").alias()
    kind, other = entry.c.type, listed.c.type
    same = or_(
        and_(kind.in_(NUMBER_TYPES), other.in_(NUMBER_TYPES), entry.c.atom == listed.c.atom),
        and_(kind == "text", other == "text", entry.c.atom == listed.c.atom),
        and_(kind.in_(("null", "true", "false")), kind == other),
        # Objects and arrays: compared as JSON by Python (key order and number spelling
        # may differ between equal values).
        and_(
            kind.in_(("object", "array")), kind == other, _JSON_EQUAL(entry.c.value, listed.c.value)
        ),
    )
    return select(literal(1)).select_from(listed).where(same).exists()


SQLITE_JSON_EQUAL = "embedq_json_equal"
_JSON_EQUAL = getattr(func, SQLITE_JSON_EQUAL)


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Any:
    return json.loads(text)


def _sqlite_json_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return json_equal(json.loads(a), _parsed(b))


def register_sqlite_functions(dbapi_connection: Any, _record: Any = None) -> None:
    """Give a new SQLite connection the functions compiled filters call."""
    dbapi_connection.create_function(SQLITE_JSON_EQUAL, 2, _sqlite_json_equal, deterministic=True)


# --- The language as JSON Schema (the HTTP API's OpenAPI document) -------------------------


def json_schemas(ref: str) -> dict[str, dict[str, Any]]:
    """JSON Schemas of a filter (``Where``) and its parts, referring to each other under
    ``ref`` (e.g. ``#/components/schemas/``). What they cannot say is in the description:
    at most ``MAX_CONDITIONS`` conditions and ``MAX_LIST_VALUES`` listed values in all,
    ``MAX_DEPTH`` levels, ``MAX_BYTES`` as JSON, no lone surrogates."""
    value = {"$ref": f"{ref}FilterValue"}
    listed = {"type": "array", "maxItems": MAX_LIST_VALUES, "items": value}
    literal = {
        "type": "object",
        "propertyNames": {**_NAMES, "pattern": f"^(?:{_PLAIN})?$"},
        "additionalProperties": value,
    }
    return {
        "FilterValue": {
            "description": "Any JSON value a metadata value is compared with.",
            "anyOf": [*_scalars(), _array(value), _object(value)],
        },
        "FilterOperators": {
            "description": "Operators applied to one key; every one must hold.",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {op: value for op in ("$eq", "$ne")}
            | {op: listed for op in ("$in", "$nin")}
            | {op: _NUMBER for op in COMPARISONS}
            | {"$exists": {"type": "boolean"}},
        },
        "FilterCondition": {
            "description": "A value the key must equal (JSON equality), or operators.",
            "anyOf": [*_scalars(), _array(value), literal, {"$ref": f"{ref}FilterOperators"}],
        },
        "Where": _where_schema(ref),
    }


_TEXT = {"type": "string", "pattern": "^[^\\u0000]*$"}
_NAMES = {**_TEXT, "maxLength": MAX_KEY_CHARS}
_NUMBER = {"type": "number", "minimum": NUMBER_MIN, "maximum": NUMBER_MAX}
# A key that is not an operator: it does not start with $ (and holds no NUL).
_PLAIN = "[^$\\u0000][^\\u0000]*"


def _scalars() -> list[dict[str, Any]]:
    return [{"type": "null"}, {"type": "boolean"}, _NUMBER, _TEXT]


def _array(value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": value}


def _object(value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "propertyNames": _NAMES, "additionalProperties": value}


def _where_schema(ref: str) -> dict[str, Any]:
    parts = {"type": "array", "minItems": 1, "maxItems": MAX_CONDITIONS}
    parts["items"] = {"$ref": f"{ref}Where"}
    return {
        # The module's own explanation (paragraphs 2-4: the forms, then equality).
        "description": "\n\n".join((__doc__ or "").split("\n\n")[1:4]).strip()
        + f"\n\nLimits: {MAX_CONDITIONS} conditions and {MAX_LIST_VALUES} listed values in"
        f" all, {MAX_DEPTH} levels, {MAX_BYTES} bytes as JSON, keys of at most"
        f" {MAX_KEY_CHARS} characters, numbers within +-2**63, no NUL.",
        "type": "object",
        "maxProperties": MAX_CONDITIONS,
        "propertyNames": {**_NAMES, "pattern": f"^(?:\\$and|\\$or|{_PLAIN})?$"},
        "properties": {"$and": parts, "$or": parts},
        "additionalProperties": {"$ref": f"{ref}FilterCondition"},
    }
