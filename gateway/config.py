"""Configuration: one pydantic-settings ``Settings`` (env prefix ``RAGLINE_``) plus a YAML file.

The environment holds process settings (where to listen, where models live, limits); the YAML
file (``ragline serve --config FILE`` or ``RAGLINE_CONFIG``) declares the models the gateway
serves. Without a file the gateway serves one model, ``smollm2``, on the embedded engine.
Config is read once at start-up, never at import time (``gateway.config_file`` reads the file).
``Settings`` lives in ``gateway.settings`` and the models' entries in ``gateway.model_config``;
both are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from gateway.budgets import Budget
from gateway.model_config import (
    DEFAULT_MODEL_NAME as DEFAULT_MODEL_NAME,
)
from gateway.model_config import (
    AdapterConfig as AdapterConfig,
)
from gateway.model_config import (
    EmbeddedModelConfig as EmbeddedModelConfig,
)
from gateway.model_config import (
    HealthPolicy as HealthPolicy,
)
from gateway.model_config import (
    HttpModelConfig as HttpModelConfig,
)
from gateway.model_config import (
    ModelConfig as ModelConfig,
)
from gateway.model_config import (
    OpenAIModelConfig as OpenAIModelConfig,
)
from gateway.model_config import (
    UpstreamTimeouts as UpstreamTimeouts,
)
from gateway.model_config import (
    VllmModelConfig as VllmModelConfig,
)
from gateway.settings import DEFAULT_MODEL_DIRNAME as DEFAULT_MODEL_DIRNAME
from gateway.settings import Settings as Settings
from prompts.experiments import Experiment
from prompts.registry import builtin_names
from rag import HYBRID_WEIGHTS, RELEVANCE_FLOOR
from safety.policy import PolicySpec


class PromptsConfig(BaseModel):
    """Where prompt templates live."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(
        default=None, description="Directory of template YAML files (relative: to this file)."
    )
    watch: bool = Field(default=False, description="Reload when a file there changes.")


class RagConfig(BaseModel):
    """Retrieval for a route: the last user message is searched in ``store``."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="Vector store id or name.")
    top_k: int = Field(default=4, ge=1, le=50, description="Chunks put into the prompt.")
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    fusion: Literal["zscore", "rrf"] = "zscore"
    weights: tuple[float, float] = Field(default=HYBRID_WEIGHTS, description="(bm25, dense).")
    filters: dict[str, Any] | None = Field(default=None, description="OpenAI-style filter.")
    score_threshold: float | None = None
    min_similarity: float | None = Field(
        default=RELEVANCE_FLOOR,
        ge=-1,
        le=1,
        description="Chunks less similar to the question (cosine) are neither prompted nor "
        "cited; null: no floor. The default was cross-validated for the packaged MiniLM.",
    )
    mmr: float | None = Field(default=None, ge=0, le=1, description="MMR lambda; unset: off.")


class SafetyConfig(BaseModel):
    """Safety policies (``safety/``), on out of the box: every key and route gets the ``default``
    policy unless it names another (or ``off``). ``enabled: false`` switches scanning off for
    the whole gateway."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Scan requests with their policies.")
    policies: list[PolicySpec] = Field(
        default_factory=list, description="Named policies; `default` and `off` are built in."
    )

    @field_validator("policies")
    @classmethod
    def _names(cls, policies: list[PolicySpec]) -> list[PolicySpec]:
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise ValueError("safety policy names must be unique")
        if "off" in names:
            raise ValueError("`off` is built in (no scanning) and cannot be redefined")
        return policies

    def names(self) -> set[str]:
        return {"default", "off", *(p.name for p in self.policies)}


class RouteConfig(BaseModel):
    """A public model name that serves a base model or adapter through a template/experiment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Public model id clients send as `model`.")
    model: str = Field(description="A base model (a `models` entry) or an adapter name.")
    template: str | None = Field(default=None, description="`name`, `name@version`, `name:label`.")
    experiment: str | None = Field(default=None, description="An `experiments` entry.")
    variables: dict[str, Any] = Field(
        default_factory=dict, description="Template variables the route fixes (requests may not)."
    )
    rag: RagConfig | None = Field(
        default=None, description="Ground answers in a vector store (template: grounded-qa)."
    )
    safety_policy: str | None = Field(
        default=None, description="Safety policy for this route (else the key's)."
    )
    description: str = ""


class KeyPolicy(BaseModel):
    """What one API key may do."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Models, routes and adapters this key may call (glob patterns).",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Prompt + completion tokens/minute.")
    max_tokens: int | None = Field(default=None, ge=1, description="Largest max_tokens allowed.")
    safety_policy: str = "default"
    cache: bool = True
    prompt_overrides: bool = Field(
        default=True, description="May choose a template per request (`ragline.template`)."
    )
    vector_stores: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Vector stores (ids or names, glob patterns) this key may use and change.",
    )
    metrics: bool = Field(
        default=False, description="May read /metrics (which names every key id); admins may."
    )
    upload_bytes_per_day: int | None = Field(
        default=None, ge=0, description="Upload quota per UTC day; default: the server's."
    )
    max_vector_stores: int | None = Field(
        default=None, ge=0, description="Vector stores this key may own; default: the server's."
    )
    team: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="The team the usage ledger books this key's requests to.",
    )
    budget: Budget | None = Field(
        default=None, description="Token and cost budgets per day and month for this key."
    )
    console: bool = Field(
        default=False,
        description="May open the admin console and read the admin routes (GET only): "
        "usage, budgets, keys, prompts, safety findings; admins may change them.",
    )


class ModelPrice(BaseModel):
    """What a model's tokens cost, per million, for the usage ledger."""

    model_config = ConfigDict(extra="forbid")

    prompt: float = Field(default=0.0, ge=0, description="Per million prompt tokens.")
    completion: float = Field(default=0.0, ge=0, description="Per million completion tokens.")


class TeamConfig(BaseModel):
    """A team: the keys whose policy names it share its budget."""

    model_config = ConfigDict(extra="forbid")

    budget: Budget | None = None


class KeyConfig(BaseModel):
    """An API key declared in the config file, by the SHA-256 of the key (never the key)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Shown in logs and metrics.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="`ragline keys hash KEY` prints it.")
    name: str = ""
    admin: bool = False
    policy: KeyPolicy = Field(default_factory=KeyPolicy)


class FileConfig(BaseModel):
    """The YAML file's schema."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list)
    adapters: list[AdapterConfig] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    routes: list[RouteConfig] = Field(default_factory=list)
    experiments: list[Experiment] = Field(default_factory=list)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    teams: dict[str, TeamConfig] = Field(
        default_factory=dict, description="Teams (a key policy's `team`) and their budgets."
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Per model, route or adapter name: the price per million tokens the usage "
        "ledger computes cost with (none: cost 0).",
    )

    @model_validator(mode="after")
    def _safety_names(self) -> FileConfig:
        known = self.safety.names()
        uses = [(f"keys[{k.id}]", k.policy.safety_policy) for k in self.keys]
        uses += [(f"routes[{r.name}]", r.safety_policy) for r in self.routes if r.safety_policy]
        for where, name in uses:
            if name not in known:
                raise ValueError(f"{where}: safety policy {name!r} is not declared under safety")
        return self

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, keys: list[KeyConfig]) -> list[KeyConfig]:
        for attr in ("id", "sha256"):
            values = [getattr(k, attr) for k in keys]
            if len(set(values)) != len(values):
                raise ValueError(f"API keys must have unique {attr} values")
        return keys

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> FileConfig:
        names = {m.name for m in self.models}
        for model in self.models:
            for other in model.fallbacks:
                if other == model.name or other not in names:
                    raise ValueError(
                        f"model {model.name!r}: fallback {other!r} must be another model "
                        "declared under models"
                    )
            if len(set(model.fallbacks)) != len(model.fallbacks):
                raise ValueError(f"model {model.name!r}: fallbacks repeat a model")
        return self

    @model_validator(mode="after")
    def _adapters_have_bases(self) -> FileConfig:
        models = {m.name: m for m in self.models}
        seen: set[str] = set()
        for adapter in self.adapters:
            base = models.get(adapter.base)
            if base is None:
                raise ValueError(
                    f"adapter {adapter.name!r}: base model {adapter.base!r} is not "
                    "declared under models"
                )
            if adapter.name in models or adapter.name in seen:
                raise ValueError(f"adapter name {adapter.name!r} is already taken")
            seen.add(adapter.name)
        return self

    @model_validator(mode="after")
    def _routes_resolve(self) -> FileConfig:
        models = {m.name: m for m in self.models}
        adapters = {a.name: a for a in self.adapters}
        experiments = {e.name: e for e in self.experiments}
        if len(experiments) != len(self.experiments):
            raise ValueError("experiment names must be unique")
        seen: set[str] = set()
        for route in self.routes:
            if route.rag is not None and route.template is None and route.experiment is None:
                route.template = "grounded-qa"  # the built-in grounded template
            if route.name in models or route.name in adapters or route.name in seen:
                raise ValueError(f"route name {route.name!r} is already taken")
            seen.add(route.name)
            adapter = adapters.get(route.model)
            base = models.get(adapter.base if adapter else route.model)
            if base is None:
                raise ValueError(
                    f"route {route.name!r}: {route.model!r} is neither a model nor an adapter"
                )
            if route.experiment is not None and route.experiment not in experiments:
                raise ValueError(
                    f"route {route.name!r}: experiment {route.experiment!r} is not declared"
                )
            templated = route.template is not None or route.experiment is not None
            builtin = route.template is not None and _template_name(route.template) in (
                builtin_names()
            )
            if templated and not builtin and self.prompts.dir is None:
                raise ValueError(
                    f"route {route.name!r} uses template {route.template or route.experiment!r}, "
                    f"which is not built in ({', '.join(sorted(builtin_names()))}), and "
                    "prompts.dir is not set"
                )
            if templated and isinstance(base, HttpModelConfig) and base.tokenizer is None:
                raise ValueError(
                    f"route {route.name!r}: templates count tokens with the served model's "
                    f"tokenizer; set `tokenizer` on model {base.name!r}"
                )
            if route.experiment is not None and route.template is None:
                missing = [v.name for v in experiments[route.experiment].variants if not v.template]
                if missing:
                    raise ValueError(
                        f"route {route.name!r}: variants {missing} name no template and the "
                        "route has none"
                    )
        return self

    def template_refs(self) -> list[tuple[str, str]]:
        """Every template reference in this file, with where it is (checked at start-up)."""
        refs = [(f"routes[{r.name}].template", r.template) for r in self.routes if r.template]
        for e in self.experiments:
            refs += [
                (f"experiments[{e.name}].variants[{v.name}]", v.template)
                for v in e.variants
                if v.template
            ]
        return refs


def _template_name(ref: str) -> str:
    return ref.split("@")[0].split(":")[0].strip()
