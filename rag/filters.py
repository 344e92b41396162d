"""Metadata filters in OpenAI's vector-store shape, compiled to a row mask of a snapshot.

``{"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key": K, "value": V}`` and
``{"type": "and"|"or", "filters": [...]}``. A key that no chunk in the store has is an error (a
typo would otherwise silently match nothing); a chunk without the key does not match a comparison.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from rag.snapshot import Snapshot, StoreError

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda a, b: a in b,
    "nin": lambda a, b: a not in b,
}
_MISSING = object()
Predicate = Callable[[dict[str, Any]], bool]


def compile_filter(spec: dict[str, Any], fields: set[str], where: str = "filters") -> Predicate:
    if not isinstance(spec, dict) or "type" not in spec:
        raise StoreError(f"{where} must be an object with a `type`", "invalid_filter", param=where)
    kind = spec["type"]
    if kind in ("and", "or"):
        parts = spec.get("filters")
        if not isinstance(parts, list) or not parts:
            raise StoreError(
                f"{where}.filters must be a non-empty list", "invalid_filter", param=where
            )
        preds = [compile_filter(p, fields, f"{where}.filters[{i}]") for i, p in enumerate(parts)]
        if kind == "and":
            return lambda meta: all(p(meta) for p in preds)
        return lambda meta: any(p(meta) for p in preds)
    compare = _COMPARE.get(kind)
    if compare is None:
        raise StoreError(
            f"{where}.type {kind!r} is not one of {', '.join([*_COMPARE, 'and', 'or'])}",
            "invalid_filter",
            param=where,
        )
    key, value = spec.get("key"), spec.get("value")
    if not isinstance(key, str):
        raise StoreError(f"{where}.key must be a string", "invalid_filter", param=where)
    if key not in fields:
        raise StoreError(
            f"{where}: no document in this store has the attribute {key!r}",
            "unknown_filter_field",
            param=where,
        )
    if kind in ("in", "nin") and not isinstance(value, list):
        raise StoreError(
            f"{where}.value must be a list for {kind!r}", "invalid_filter", param=where
        )

    def predicate(meta: dict[str, Any]) -> bool:
        actual = meta.get(key, _MISSING)
        if actual is _MISSING:
            return kind == "nin" or kind == "ne"
        try:
            return bool(compare(actual, value))
        except TypeError:  # e.g. a number compared with a string: no match, not an error
            return False

    return predicate


def row_mask(snapshot: Snapshot, spec: dict[str, Any] | None) -> np.ndarray | None:
    """Boolean mask over the snapshot's rows, or None for no filter."""
    if spec is None:
        return None
    predicate = compile_filter(spec, snapshot.fields)
    return np.fromiter(
        (predicate(c.metadata) for c in snapshot.chunks), dtype=bool, count=len(snapshot.chunks)
    )
