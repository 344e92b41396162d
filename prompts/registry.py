"""The template registry: load a directory of YAML files, validate everything, resolve references.

A reference is ``name`` (the version labelled ``production``, else the newest), ``name@3`` (that
version) or ``name:canary`` (the version carrying that label). Loading checks every file before
anything is served: schema, Jinja syntax, variables used but not declared, duplicate versions,
a label on two versions; errors name the file and line. ``PromptCatalog`` holds the current
registry and swaps in a new one on reload, so requests already rendering keep the old one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from jinja2 import TemplateSyntaxError, meta

from prompts.template import (
    _ENV,
    BUILTIN_VARIABLES,
    PromptError,
    Template,
    TemplateSpec,
    parse_spec,
    variable_lines,
)

log = logging.getLogger("ragline.prompts")
_REF = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<version>\d+)|:(?P<label>[^@:]+))?$")
DEFAULT_LABEL = "production"
# templates shipped with ragline (grounded-qa, capital-qa): always served, under any prompts.dir
# that does not define a template of the same name
BUILTIN_DIR = Path(__file__).resolve().parent / "templates"


def builtin_names() -> set[str]:
    return {p.stem for p in BUILTIN_DIR.glob("*.yaml")}


class PromptLoadError(PromptError):
    """One or more template files are invalid; ``errors`` lists each as ``file:line: what``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid prompt templates:\n  " + "\n  ".join(errors))
        self.errors = errors


class PromptRegistry:
    def __init__(self, templates: Iterable[Template] = (), directory: Path | None = None) -> None:
        self.directory = directory
        self._by_name: dict[str, dict[int, Template]] = {}
        for t in templates:
            self._by_name.setdefault(t.spec.name, {})[t.spec.version] = t

    @classmethod
    def load(cls, directory: Path | None) -> PromptRegistry:
        """The templates under ``directory`` and the built-in ones it does not override (a
        name defined there replaces the built-in template of that name, every version)."""
        own = cls._load_dir(directory) if directory is not None else []
        names = {t.spec.name for t in own}
        builtin = (
            []
            if directory is not None and directory.resolve() == BUILTIN_DIR
            else ([t for t in cls._load_dir(BUILTIN_DIR) if t.spec.name not in names])
        )
        return cls([*own, *builtin], directory)

    @classmethod
    def _load_dir(cls, directory: Path) -> list[Template]:
        if not directory.is_dir():
            raise PromptLoadError([f"{directory}: not a directory"])
        errors: list[str] = []
        seen: dict[tuple[str, int], str] = {}
        labels: dict[tuple[str, str], str] = {}
        templates: list[Template] = []
        for path in sorted([*directory.rglob("*.yaml"), *directory.rglob("*.yml")]):
            for template, where in _load_file(path, errors):
                spec = template.spec
                if (spec.name, spec.version) in seen:
                    errors.append(
                        f"{where}: {spec.name} version {spec.version} is also defined at "
                        f"{seen[spec.name, spec.version]}"
                    )
                    continue
                seen[spec.name, spec.version] = where
                for label in spec.labels:
                    if (spec.name, label) in labels:
                        errors.append(
                            f"{where}: label {label!r} of {spec.name} is also on "
                            f"{labels[spec.name, label]}"
                        )
                    labels[spec.name, label] = where
                templates.append(template)
        if errors:
            raise PromptLoadError(errors)
        return templates

    def resolve(self, ref: str) -> Template:
        match = _REF.match(ref.strip())
        if match is None:
            raise PromptError(
                f"bad template reference {ref!r}; use name, name@version or name:label"
            )
        name = match["name"]
        versions = self._by_name.get(name)
        if not versions:
            raise PromptError(f"no prompt template named {name!r}")
        if match["version"] is not None:
            template = versions.get(int(match["version"]))
            if template is None:
                raise PromptError(
                    f"template {name!r} has no version {match['version']}; it has "
                    f"{', '.join(str(v) for v in sorted(versions))}"
                )
            return template
        label = match["label"]
        for template in versions.values():
            if (label or DEFAULT_LABEL) in template.spec.labels:
                return template
        if label is not None:
            raise PromptError(f"template {name!r} has no version labelled {label!r}")
        return versions[max(versions)]

    def check_refs(self, refs: Iterable[tuple[str, str]]) -> None:
        """Raise ``PromptLoadError`` naming each ``(where, ref)`` that does not resolve."""
        errors = []
        for where, ref in refs:
            try:
                self.resolve(ref)
            except PromptError as exc:
                errors.append(f"{where}: {exc.message}")
        if errors:
            raise PromptLoadError(errors)

    def describe(self) -> list[dict[str, Any]]:
        """For ``GET /admin/prompts``: name, versions, labels, source files."""
        out = []
        for name in sorted(self._by_name):
            versions = self._by_name[name]
            out.append(
                {
                    "name": name,
                    "versions": sorted(versions),
                    "labels": {
                        label: v for v, t in sorted(versions.items()) for label in t.spec.labels
                    },
                    "default": self.resolve(name).spec.version,
                    "sources": sorted({t.source for t in versions.values()}),
                }
            )
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())


class PromptCatalog:
    """The registry being served, replaced whole on reload (file watch or admin call)."""

    def __init__(self, directory: Path | None, refs: list[tuple[str, str]] | None = None) -> None:
        self.directory = directory
        self.refs = refs or []
        self.generation = 0
        self.current = self._build()

    def _build(self) -> PromptRegistry:
        registry = PromptRegistry.load(self.directory)
        registry.check_refs(self.refs)
        return registry

    def reload(self) -> PromptRegistry:
        """Load and validate again; on any error the current registry keeps serving."""
        registry = self._build()
        self.current = registry
        self.generation += 1
        log.info(
            "prompt templates reloaded: %d versions (generation %d)", len(registry), self.generation
        )
        return registry

    async def watch(self) -> None:
        """Reload whenever a file under the directory changes (``watchfiles``)."""
        if self.directory is None:
            return
        from watchfiles import awatch

        async for _ in awatch(self.directory, debounce=200):
            try:
                await asyncio.to_thread(self.reload)
            except PromptError as exc:
                log.error("prompt reload failed; still serving the previous templates: %s", exc)


# -- loading one file ----------------------------------------------------------------------------


def _load_file(path: Path, errors: list[str]) -> list[tuple[Template, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{path}: cannot read: {exc}")
        return []
    out = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            line = node.start_mark.line + 1
            where = f"{path}:{line}"
            raw = loader.construct_document(node)
            try:
                spec = parse_spec(raw, where)
                if _check_jinja(spec, node, path, errors):
                    out.append((Template(spec, where), where))
            except PromptError as exc:
                errors.append(exc.message)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        errors.append(f"{at}: not valid YAML: {getattr(exc, 'problem', exc)}")
    finally:
        loader.dispose()
    return out


def _check_jinja(spec: TemplateSpec, node: yaml.Node, path: Path, errors: list[str]) -> bool:
    """Syntax and undeclared variables, with the line in the YAML file; False on errors."""
    failed = False
    for part in ("system", "user"):
        text = getattr(spec, part)
        if not text:
            continue
        start = _value_line(node, part)
        try:
            ast = _ENV.parse(text)
        except TemplateSyntaxError as exc:
            errors.append(f"{path}:{start + exc.lineno - 1}: bad Jinja in {part}: {exc.message}")
            failed = True
            continue
        for name in sorted(meta.find_undeclared_variables(ast)):
            if name not in spec.variables and name not in BUILTIN_VARIABLES:
                line = start + variable_lines(text, name) - 1
                errors.append(
                    f"{path}:{line}: {part} uses the undeclared variable {name!r} "
                    "(declare it under variables)"
                )
                failed = True
    return not failed


def _value_line(node: yaml.Node, key: str) -> int:
    """1-based file line where the value of ``key`` starts (block scalars: the next line)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                block = getattr(v, "style", None) in ("|", ">")
                return int(v.start_mark.line) + 1 + (1 if block else 0)
    return int(node.start_mark.line) + 1
