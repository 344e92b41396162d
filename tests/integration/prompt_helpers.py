"""Shared by the prompt-template API tests: templates, config sections, SDK helpers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import openai

from tests.conftest import REPO, Gateway

TEAM, LOCKED, OTHER, ADMIN = "sk-team-123456", "sk-locked-123456", "sk-other-123456", "sk-ops-1234"
EXPERIMENT = {
    "name": "capital-ab",
    "unit": "user",
    "variants": [
        {"name": "compact", "weight": 1, "template": "capital-qa@2"},
        {"name": "verbose", "weight": 1, "template": "capital-qa@1", "params": {"max_tokens": 20}},
    ],
}
SUPPORT = """
name: support
version: 1
variables:
  product: {type: string}
system: "You help customers of {{ product }}."
user: "{{ input }}"
"""


def templates_dir(tmp: Path) -> Path:
    directory = tmp / "templates"
    shutil.copytree(REPO / "prompts" / "templates", directory)
    (directory / "support.yaml").write_text(SUPPORT)
    return directory


def config(directory: Path, watch: bool = False) -> dict[str, object]:
    return {
        "prompts": {"dir": str(directory), "watch": watch},
        "routes": [
            {"name": "capitals", "model": "smollm2", "template": "capital-qa"},
            {"name": "capitals-ab", "model": "smollm2", "experiment": "capital-ab"},
            {
                "name": "support",
                "model": "smollm2",
                "template": "support",
                "variables": {"product": "Acme"},
            },
        ],
        "experiments": [EXPERIMENT],
    }


def sdk(gw: Gateway, key: str = TEAM) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)


def ragline(response: Any) -> dict[str, Any]:
    extra = response.model_extra or {}
    assert "ragline" in extra, response
    return dict(extra["ragline"])


def ask(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "Answer the question."}])
    kwargs.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, temperature=0, **kwargs)


def ask_grounded(
    gw: Gateway, question: str, docs: list[dict[str, str]], max_tokens: int = 24
) -> Any:
    """A question answered by the shipped ``grounded-qa`` template over ``docs``."""
    return ask(
        sdk(gw),
        "smollm2",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        extra_body={"ragline": {"template": "grounded-qa", "context": docs}},
    )
