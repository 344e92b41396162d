"""Prompt templates: the YAML schema, the sandboxed Jinja2 environment and rendering to messages.

One YAML document is one version of one template::

    name: capital-qa
    version: 2
    labels: [production]
    variables:
      country: {type: string}
      style: {type: string, default: "short"}
    system: |
      Answer with the city name only.
    user: "What is the capital of {{ country }}?"
    few_shot: {mode: static, k: 2, examples: [{user: "...", assistant: "..."}]}
    chain_of_thought: "Think step by step, then give the answer."
    output_format: "One line: the city."

Templates render in an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined``: an undeclared
or missing variable is an error, never an empty string, and attribute access to Python internals
(``''.__class__``) is refused. Literal braces (JSON examples, code) need no escaping; only
``{{ }}``, ``{% %}`` and ``{# #}`` are Jinja syntax.

Built-in variables every template may use: ``input`` (the text of the request's last user
message) and ``context`` (retrieved chunks: a list of ``{"text", "source", "id"}`` objects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_VARIABLES = frozenset({"input", "context"})
TrimPart = Literal["context", "few_shot", "history"]
TRIM_PARTS: tuple[TrimPart, ...] = ("context", "few_shot", "history")
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
)
_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "list": list,
    "object": dict,
}


class PromptError(Exception):
    """A template could not be loaded or rendered; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Variable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "integer", "number", "boolean", "list", "object"] = "string"
    default: Any = None
    required: bool | None = Field(
        default=None, description="Default: required unless a default is given."
    )
    description: str = ""

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


class Example(BaseModel):
    """One few-shot example: a user turn and the assistant's answer."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


class FewShot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["static", "dynamic"] = "static"
    k: int = Field(default=3, ge=1, description="Examples to include (at most).")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Token budget for all examples together."
    )
    examples: list[Example] = Field(min_length=1)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trim_order: list[TrimPart] = Field(
        default_factory=lambda: list(TRIM_PARTS),
        description="What gives way first when the prompt does not fit the context window.",
    )


class TemplateSpec(BaseModel):
    """One template version as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    version: int = Field(ge=1)
    labels: list[str] = Field(default_factory=list)
    description: str = ""
    variables: dict[str, Variable] = Field(default_factory=dict)
    system: str | None = None
    user: str = "{{ input }}"
    few_shot: FewShot | None = None
    chain_of_thought: str | None = None
    output_format: str | None = None
    budget: Budget = Field(default_factory=Budget)

    @model_validator(mode="after")
    def _check(self) -> TemplateSpec:
        for label in self.labels:
            if not re.match(NAME, label):
                raise ValueError(f"label {label!r} must match {NAME}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        clash = BUILTIN_VARIABLES & set(self.variables)
        if clash:
            raise ValueError(f"variables {sorted(clash)} are built in; choose other names")
        return self


@dataclass
class Rendered:
    """A rendered prompt: the chat messages and what went into them."""

    messages: list[dict[str, str]]
    examples: int = 0
    context: int = 0
    history: int = 0
    trimmed: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int | None = None


class Template:
    """A validated, compiled ``TemplateSpec``."""

    def __init__(self, spec: TemplateSpec, source: str = "<string>") -> None:
        self.spec = spec
        self.source = source
        self._system = _compile(spec.system, "system", source) if spec.system else None
        self._user = _compile(spec.user, "user", source)

    @property
    def ref(self) -> str:
        return f"{self.spec.name}@{self.spec.version}"

    def used_variables(self) -> set[str]:
        used: set[str] = set()
        for text in (self.spec.system, self.spec.user):
            if text:
                used |= meta.find_undeclared_variables(_ENV.parse(text))
        return used

    def bind(self, values: dict[str, Any] | None, user_input: str) -> dict[str, Any]:
        """Check ``values`` against the declared variables; fill defaults."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.spec.variables))
        if unknown:
            raise PromptError(
                f"template {self.ref} has no variable {unknown[0]!r}; it declares: "
                f"{', '.join(sorted(self.spec.variables)) or 'none'}",
                param=f"ragline.variables.{unknown[0]}",
            )
        out: dict[str, Any] = {"input": user_input, "context": []}
        for name, var in self.spec.variables.items():
            if name in values:
                value = values[name]
                expected = _PY_TYPES[var.type]
                wrong_bool = var.type in ("integer", "number") and isinstance(value, bool)
                if not isinstance(value, expected) or wrong_bool:
                    raise PromptError(
                        f"variable {name!r} of template {self.ref} must be a {var.type}; "
                        f"got {type(value).__name__}",
                        param=f"ragline.variables.{name}",
                    )
                out[name] = value
            elif var.is_required:
                raise PromptError(
                    f"template {self.ref} needs the variable {name!r}",
                    param=f"ragline.variables.{name}",
                )
            else:
                out[name] = var.default
        return out

    def render(
        self,
        variables: dict[str, Any],
        *,
        history: list[dict[str, str]] | None = None,
        examples: list[Example] | None = None,
        context: list[dict[str, Any]] | None = None,
        system: str | None = None,
    ) -> list[dict[str, str]]:
        """Messages: system (+ chain of thought + output format + the client's own system
        text), examples, history, user."""
        values = {**variables, "context": context or []}
        system_parts = []
        if self._system is not None:
            system_parts.append(_render(self._system, values, self.ref, "system"))
        if self.spec.chain_of_thought:
            system_parts.append(self.spec.chain_of_thought.strip())
        if self.spec.output_format:
            system_parts.append(self.spec.output_format.strip())
        if system:
            system_parts.append(system.strip())
        messages: list[dict[str, str]] = []
        system = "\n\n".join(p for p in system_parts if p)
        if system:
            messages.append({"role": "system", "content": system})
        for example in examples or []:
            messages.append({"role": "user", "content": example.user})
            messages.append({"role": "assistant", "content": example.assistant})
        messages.extend(history or [])
        messages.append({"role": "user", "content": _render(self._user, values, self.ref, "user")})
        return messages


def parse_spec(raw: object, source: str) -> TemplateSpec:
    try:
        return TemplateSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "document"
        raise PromptError(f"{source}: {where}: {err['msg']}") from None


def _compile(text: str, part: str, source: str) -> Any:
    try:
        return _ENV.from_string(text)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line} of the {part} template)" if line else ""
        raise PromptError(f"{source}: {part}: bad Jinja{where}: {exc}") from None


def _render(compiled: Any, values: dict[str, Any], ref: str, part: str) -> str:
    try:
        return str(compiled.render(values)).strip()
    except SecurityError as exc:
        raise PromptError(f"template {ref} ({part}) tried an unsafe operation: {exc}") from None
    except TemplateError as exc:
        raise PromptError(f"template {ref} ({part}) failed to render: {exc}") from None


def variable_lines(text: str, name: str) -> int:
    """1-based line of the first use of ``name`` in a Jinja template (for error messages)."""
    for node in _ENV.parse(text).find_all(nodes.Name):
        if node.name == name:
            return int(node.lineno)
    return 1
