"""One formatter for configuration errors: the YAML file's and the environment's.

A pydantic ``ValidationError`` becomes one line per problem: ``file:line: path: what was
expected``, with a "did you mean" for a misspelt setting or choice, and never the value of a
secret field (a key's ``sha256``, an ``api_key``, the admin key). No pydantic URL, no input dump.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

# fields whose values are never repeated in an error (keys, their hashes, upstream tokens)
SECRET_FIELDS = frozenset({"sha256", "api_key", "admin_key", "key", "secret", "token", "password"})
_QUOTED = re.compile(r"'([^']*)'")
_SHOWN_VALUE_CHARS = 40

Loc = tuple[int | str, ...]


def yaml_lines(text: str) -> dict[Loc, int]:
    """Line numbers (1-based) of every mapping key and sequence item in a YAML document, by
    path: ``("models", 0, "max_batch") -> 7``. Empty when the text does not compose."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, path: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


def format_problems(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    source: str | None = None,
    lines: dict[Loc, int] | None = None,
    env_prefix: str | None = None,
) -> list[str]:
    """One line per error in ``exc`` (raised validating ``model``)."""
    out = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        if error["type"] == "union_tag_invalid":
            loc = (*loc, "backend")  # the discriminating key is where the mistake is
        path = _yaml_path(loc, lines or {})
        where = _where(path, loc, source, lines or {}, env_prefix)
        out.append(f"{where}{_describe(error, loc, model)}")
    return out


def format_error(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    heading: str,
    source: str | None = None,
    text: str | None = None,
    env_prefix: str | None = None,
) -> str:
    """``heading`` and the problems below it, one per line."""
    lines = yaml_lines(text) if text is not None else {}
    problems = format_problems(exc, model, source=source, lines=lines, env_prefix=env_prefix)
    noun = "problem" if len(problems) == 1 else "problems"
    return "\n".join([f"{heading} ({len(problems)} {noun}):", *(f"  {p}" for p in problems)])


def _yaml_path(loc: Loc, lines: dict[Loc, int]) -> Loc:
    """``loc`` without pydantic's union tags (``models.0.embedded.path`` -> ``models.0.path``)."""
    path: Loc = ()
    for part in loc:
        if (*path, part) in lines or not lines or isinstance(part, str) and not _is_tag(part):
            path = (*path, part)
    return path


def _is_tag(part: str) -> bool:
    return part in {"embedded", "vllm", "openai"} or "[" in part or part.endswith("()")


def _where(
    path: Loc, loc: Loc, source: str | None, lines: dict[Loc, int], env_prefix: str | None
) -> str:
    if env_prefix is not None:
        field = str(loc[0]) if loc else ""
        return f"{env_prefix}{field.upper()} (--{field.replace('_', '-')}): "
    line = None
    for n in range(len(path), 0, -1):  # the deepest part of the path the file has
        line = lines.get(path[:n])
        if line is not None:
            break
    prefix = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
    dotted = _dotted(path)
    return f"{prefix}{dotted}: " if dotted else prefix


def _dotted(path: Loc) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: Any, loc: Loc, model: type[BaseModel]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    secret = any(isinstance(p, str) and p in SECRET_FIELDS for p in loc)
    value = error.get("input")
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        known = _fields_at(model, loc[:-1])
        hint = _did_you_mean(name, known)
        listing = f" (settings here: {', '.join(sorted(known))})" if known and not hint else ""
        return f"unknown setting{hint}{listing}"
    if kind == "union_tag_invalid":
        options = _QUOTED.findall(str(ctx.get("expected_tags", "")))
        tag = str(ctx.get("tag", ""))
        return f"{tag!r} is not one of {', '.join(options)}{_did_you_mean(tag, options)}"
    if kind in {"literal_error", "enum"}:
        options = _QUOTED.findall(str(ctx.get("expected", "")))
        got = "" if secret else f", got {_show(value)}"
        hint = "" if secret else _did_you_mean(str(value), options)
        return f"expected one of {', '.join(options)}{got}{hint}"
    if kind == "missing":
        return "required, but not set"
    if secret:
        return _secret_message(loc, value)
    msg = error["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg
    if kind in {
        "string_type",
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "list_type",
        "dict_type",
        "model_type",
    }:
        return f"{msg[0].lower()}{msg[1:]}, got {_show(value)}"
    return f"{msg[0].lower()}{msg[1:]}" if msg else kind


def _secret_message(loc: Loc, value: Any) -> str:
    field = str(next(p for p in reversed(loc) if isinstance(p, str) and p in SECRET_FIELDS))
    if field == "sha256":
        hint = ""
        if isinstance(value, str) and value.startswith("rl-"):
            hint = "; this looks like a key itself: put only its hash in the file"
        return (
            "expected the SHA-256 of a key, 64 lowercase hex digits (`ragline keys hash KEY` "
            f"prints it); the value is not shown{hint}"
        )
    return f"invalid {field} (the value is not shown)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The field names of the model found at ``loc`` below ``model`` (empty if none)."""
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    current = _strip(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return _strip(args[0])
    return tp


def _step(current: Any, part: int | str) -> Any:
    current = _strip(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        field = current.model_fields.get(str(part))
        return field.annotation if field is not None else None
    origin = typing.get_origin(current)
    if origin in (list, tuple, set, frozenset) and isinstance(part, int):
        return typing.get_args(current)[0]
    if origin is dict:
        return typing.get_args(current)[1]
    if origin in (Union, types.UnionType) and isinstance(part, str):
        for option in typing.get_args(current):  # a tagged union: pydantic's loc names the tag
            inner = _strip(option)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                backend = inner.model_fields.get("backend")
                tags = typing.get_args(backend.annotation) if backend else ()
                if part in tags or part == inner.__name__:
                    return inner
    return None
