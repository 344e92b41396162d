"""Prompt templates through a real gateway on the embedded engine with the ``openai`` SDK:
routes, experiments, feedback, per-request templates, budgets, hot reload and file watching;
``ragline eval prompts`` against the gateway. (vLLM: ``test_prompts_vllm.py``.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import hash_key
from prompts.experiments import Experiment
from tests.conftest import REPO, Gateway, start_gateway, stop_gateway, wait_until
from tests.integration.prompt_helpers import (
    ADMIN,
    EXPERIMENT,
    LOCKED,
    OTHER,
    TEAM,
    ask,
    ask_grounded,
    config,
    ragline,
    sdk,
    templates_dir,
)


@pytest.fixture(scope="module")
def gw(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("prompts")
    keys = [
        {"id": "team", "sha256": hash_key(TEAM)},
        {"id": "locked", "sha256": hash_key(LOCKED), "policy": {"prompt_overrides": False}},
        {"id": "other", "sha256": hash_key(OTHER)},
        {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
    ]
    gateway = start_gateway(
        tmp,
        models=[{"name": "smollm2", "backend": "embedded"}],
        keys=keys,
        extra=config(templates_dir(tmp), watch=True),
    )
    yield gateway
    stop_gateway(gateway)


def test_route_answers_from_its_template(gw: Gateway) -> None:
    r = ask(sdk(gw), "capitals", extra_body={"ragline": {"variables": {"country": "France"}}})
    assert "Paris" in (r.choices[0].message.content or "")
    info = ragline(r)["prompt"]
    assert info["template"] == "capital-qa@2" and info["route"] == "capitals"
    assert info["examples"] == 1 and info["trimmed"] == {}
    # the budget counted the prompt exactly as the engine did
    assert r.usage is not None and info["prompt_tokens"] == r.usage.prompt_tokens
    models = {m.id: m for m in sdk(gw).models.list()}
    assert models["capitals"].model_extra["parent"] == "smollm2"  # type: ignore[index]


def test_route_variables_are_fixed_and_client_system_text_is_kept(gw: Gateway) -> None:
    r = ask(
        sdk(gw),
        "support",
        messages=[
            {"role": "system", "content": "Reply in one word."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Which product do you support?"},
        ],
    )
    info = ragline(r)["prompt"]
    assert info["template"] == "support@1" and info["history"] == 2
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk(gw), "support", extra_body={"ragline": {"variables": {"product": "Evil"}}})
    assert err.value.body["param"] == "ragline.variables.product"  # type: ignore[index]


def test_experiment_assigns_stickily_reports_variant_and_takes_feedback(gw: Gateway) -> None:
    exp = Experiment.model_validate(EXPERIMENT)
    client = sdk(gw)
    seen: dict[str, str] = {}
    ids = {}
    for i in range(8):
        user = f"user-{i}"
        r = ask(
            client,
            "capitals-ab",
            user=user,
            extra_body={"ragline": {"variables": {"country": "Japan"}}},
        )
        info = ragline(r)["prompt"]
        assert info["experiment"] == "capital-ab"
        assert info["variant"] == exp.assign(user).name
        assert (
            info["template"]
            == {"compact": "capital-qa@2", "verbose": "capital-qa@1"}[info["variant"]]
        )
        seen[user] = info["variant"]
        ids[info["variant"]] = r.id
    assert set(seen.values()) == {"compact", "verbose"}  # both arms served
    again = ask(
        client,
        "capitals-ab",
        user="user-3",
        extra_body={"ragline": {"variables": {"country": "Peru"}}},
    )
    assert ragline(again)["prompt"]["variant"] == seen["user-3"]  # sticky

    # streams carry the same object on the final chunk
    chunks = list(
        client.chat.completions.create(
            model="capitals-ab",
            user="user-5",
            messages=[{"role": "user", "content": "?"}],
            max_tokens=8,
            stream=True,
            extra_body={"ragline": {"variables": {"country": "Italy"}}},
        )
    )
    tagged = [c for c in chunks if (c.model_extra or {}).get("ragline")]
    assert len(tagged) == 1 and tagged[0] is [c for c in chunks if c.choices][-1]
    assert tagged[0].choices[0].finish_reason is not None
    assert ragline(tagged[0])["prompt"]["variant"] == seen["user-5"]

    headers = {"Authorization": f"Bearer {TEAM}"}
    for variant, rid in ids.items():
        r2 = httpx.post(
            gw.base_url + "/feedback", json={"request_id": rid, "score": 1}, headers=headers
        )
        assert r2.status_code == 200, r2.text
        assert r2.json()["variant"] == variant
    # by X-Request-ID too
    raw = httpx.post(
        gw.base_url + "/chat/completions",
        json={
            "model": "capitals",
            "messages": [{"role": "user", "content": "?"}],
            "max_tokens": 4,
            "ragline": {"variables": {"country": "Peru"}},
        },
        headers={**headers, "X-Request-ID": "req-feedback-1"},
    )
    assert raw.status_code == 200
    ok = httpx.post(
        gw.base_url + "/feedback",
        json={"request_id": "req-feedback-1", "score": 0.5},
        headers=headers,
    )
    assert ok.status_code == 200 and ok.json()["template"] == "capital-qa@2"
    # another key reusing the request id neither overwrites nor reads the first key's record
    other = httpx.post(
        gw.base_url + "/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "?"}],
              "max_tokens": 2, "ragline": {"template": "capital-qa@1",
                                           "variables": {"country": "Chile"}}},
        headers={"Authorization": f"Bearer {OTHER}", "X-Request-ID": "req-feedback-1"},
    )  # fmt: skip
    assert other.status_code == 200, other.text
    again = httpx.post(
        gw.base_url + "/feedback",
        json={"request_id": "req-feedback-1", "score": 0.5},
        headers=headers,
    )
    assert again.status_code == 200 and again.json()["template"] == "capital-qa@2"
    # unknown ids, another key's request and bad scores
    missing = httpx.post(
        gw.base_url + "/feedback", json={"request_id": "nope", "score": 1}, headers=headers
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    theirs = httpx.post(
        gw.base_url + "/feedback",
        json={"request_id": ids["compact"], "score": 1},
        headers={"Authorization": f"Bearer {OTHER}"},
    )
    assert theirs.status_code == 404
    nan = httpx.post(
        gw.base_url + "/feedback", content=b'{"request_id": "x", "score": NaN}', headers=headers
    )
    assert nan.status_code == 400

    text = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    requests: dict[str, float] = {}
    feedback: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ragline_prompt_requests_total" and s.labels["experiment"] == "capital-ab":
                requests[s.labels["variant"]] = requests.get(s.labels["variant"], 0) + s.value
            if s.name == "ragline_prompt_feedback_score_count" and s.labels["experiment"]:
                feedback[s.labels["variant"]] = s.value
    counts = {v: list(seen.values()).count(v) for v in ("compact", "verbose")}
    counts[seen["user-3"]] += 1
    counts[seen["user-5"]] += 1
    assert requests == counts
    assert feedback == {"compact": 1.0, "verbose": 1.0}


def test_per_request_template_with_context_and_policy(gw: Gateway) -> None:
    docs = [
        {"id": "d1", "text": "The Zephyr-9 kettle boils one litre of water in 95 seconds."},
        {"id": "d2", "text": "The Zephyr-9 kettle comes with a two-year warranty."},
    ]
    r = ask_grounded(gw, "How long is the warranty of the Zephyr-9?", docs)
    info = ragline(r)["prompt"]
    assert info["template"] == "grounded-qa@1" and info["context"] == 2 and info["examples"] == 2
    assert "two" in (r.choices[0].message.content or "").lower()
    with pytest.raises(openai.PermissionDeniedError) as denied:
        ask(sdk(gw, LOCKED), "smollm2", extra_body={"ragline": {"template": "grounded-qa"}})
    assert denied.value.body["code"] == "prompt_override_not_allowed"  # type: ignore[index]
    # the locked key still uses routes, whose templates the operator chose
    ask(sdk(gw, LOCKED), "capitals", extra_body={"ragline": {"variables": {"country": "Peru"}}})


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("smollm2", {"template": "nope"}, "ragline.template"),
        ("smollm2", {"template": "capital-qa@7"}, "ragline.template"),
        ("capitals", {"variables": {"city": "x"}}, "ragline.variables.city"),
        ("capitals", {"variables": {"country": 3}}, "ragline.variables.country"),
        ("capitals", {}, "ragline.variables.country"),
        ("smollm2", {"variables": {"a": 1}}, "ragline.template"),
        ("smollm2", {"tempalte": "x"}, "ragline.tempalte"),
    ],
)
def test_bad_template_requests_are_clear_400s(
    gw: Gateway, model: str, extra: dict, param: str
) -> None:  # type: ignore[type-arg]
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk(gw), model, extra_body={"ragline": extra})
    assert err.value.body["param"] == param, err.value.body  # type: ignore[index]


def test_completions_and_assistant_last_are_refused_on_templated_routes(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gw).completions.create(model="capitals", prompt="x", max_tokens=4)
    assert err.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as last:
        ask(sdk(gw), "support", messages=[{"role": "assistant", "content": "hi"}])
    assert last.value.body["param"] == "messages"  # type: ignore[index]


def test_budget_trims_context_and_refuses_what_cannot_fit(gw: Gateway) -> None:
    docs = [
        {"text": f"Fact {i}: " + "the sky is blue and the grass is green. " * 20} for i in range(20)
    ]
    r = ask_grounded(gw, "What colour is the sky?", docs, max_tokens=64)
    info = ragline(r)["prompt"]
    assert info["trimmed"]["context"] > 0 and info["context"] == 20 - info["trimmed"]["context"]
    assert r.usage is not None and r.usage.prompt_tokens + 64 <= 2048
    with pytest.raises(openai.BadRequestError) as err:
        ask(
            sdk(gw),
            "smollm2",
            messages=[{"role": "user", "content": "sky " * 2100}],
            extra_body={"ragline": {"template": "grounded-qa"}},
        )
    assert err.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def admin(gw: Gateway, method: str, path: str) -> httpx.Response:
    return httpx.request(
        method, gw.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    )


def test_hot_reload_under_concurrent_requests(gw: Gateway, tmp_path: Path) -> None:
    listing = admin(gw, "GET", "/admin/prompts").json()
    directory = Path(listing["directory"])
    assert {d["name"] for d in listing["data"]} >= {"capital-qa", "grounded-qa", "support"}
    assert admin(gw, "GET", "/admin/prompts").status_code == 200
    assert (
        httpx.get(
            gw.url + "/admin/prompts", headers={"Authorization": f"Bearer {TEAM}"}
        ).status_code
        == 403
    )

    source = directory / "capital-qa.yaml"
    original = source.read_text()
    v3 = (
        "\n---\nname: capital-qa\nversion: 3\nlabels: [production]\n"
        "variables:\n  country: {type: string}\nsystem: 'Name the capital.'\n"
        "user: 'Capital city of {{ country }}?'\n"
    )
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=TEAM, max_retries=0, timeout=120)

    async def one(i: int) -> str:
        r = await client.chat.completions.create(
            model="capitals",
            messages=[{"role": "user", "content": "?"}],
            max_tokens=6,
            extra_body={"ragline": {"variables": {"country": f"Country{i}"}}},
        )
        return str(ragline(r)["prompt"]["template"])

    async def in_flight(h: httpx.AsyncClient) -> float:
        text = (await h.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ragline_in_flight_requests":
                    return sample.value
        return 0.0

    async def reload_midway(tasks: list[asyncio.Task[str]]) -> tuple[httpx.Response, bool]:
        async with httpx.AsyncClient() as h:
            while await in_flight(h) < 3:  # the scrape itself is one
                assert not all(t.done() for t in tasks)
            source.write_text(
                original.replace("labels: [production, compact]", "labels: [compact]") + v3
            )
            reloaded = await h.post(
                gw.url + "/admin/prompts/reload", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            return reloaded, not all(t.done() for t in tasks)

    async def scenario() -> tuple[list[str], httpx.Response, bool]:
        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        reloaded, overlapped = await reload_midway(tasks)
        return await asyncio.gather(*tasks), reloaded, overlapped

    try:
        served, reloaded, overlapped = asyncio.run(scenario())
        assert reloaded.status_code == 200, reloaded.text
        assert overlapped  # requests were still in flight when the templates were swapped
        assert set(served) <= {"capital-qa@2", "capital-qa@3"} and len(served) == 12
        after = ask(sdk(gw), "capitals", extra_body={"ragline": {"variables": {"country": "Peru"}}})
        assert ragline(after)["prompt"]["template"] == "capital-qa@3"

        # a broken file is refused with its line, and the last good templates keep serving
        (directory / "broken.yaml").write_text("name: broken\nversion: 1\nuser: |\n  {{ oops\n")
        failed = admin(gw, "POST", "/admin/prompts/reload")
        assert failed.status_code == 400
        assert (
            f"{directory / 'broken.yaml'}:4: bad Jinja in user" in failed.json()["error"]["message"]
        )
        still = ask(sdk(gw), "capitals", extra_body={"ragline": {"variables": {"country": "Peru"}}})
        assert ragline(still)["prompt"]["template"] == "capital-qa@3"
    finally:
        (directory / "broken.yaml").unlink(missing_ok=True)
        source.write_text(original)
        assert admin(gw, "POST", "/admin/prompts/reload").status_code == 200


def test_file_watch_reloads(gw: Gateway) -> None:
    directory = Path(admin(gw, "GET", "/admin/prompts").json()["directory"])
    path = directory / "watched.yaml"
    path.write_text("name: watched\nversion: 1\nuser: 'Say {{ input }}'\n")
    try:

        def listed() -> bool:
            names = {d["name"] for d in admin(gw, "GET", "/admin/prompts").json()["data"]}
            return "watched" in names

        assert wait_until(listed, timeout=20)
        r = ask(sdk(gw), "smollm2", extra_body={"ragline": {"template": "watched"}})
        assert ragline(r)["prompt"]["template"] == "watched@1"
    finally:
        path.unlink()
    assert wait_until(lambda: not listed(), timeout=20)


def test_eval_prompts_against_a_gateway(gw: Gateway, tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "eval",
            "prompts",
            "--data",
            str(REPO / "prompts" / "eval" / "capitals.jsonl"),
            "--templates",
            str(REPO / "prompts" / "templates"),
            "--variants",
            "verbose=capital-qa@1,compact=capital-qa@2",
            "--base-url",
            gw.base_url,
            "--api-key",
            TEAM,
            "--tokenizer",
            str(model_path),
            "--limit",
            "4",
            "--max-tokens",
            "12",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verbose" in proc.stdout and "compact" in proc.stdout
    results = {r["variant"]: r for r in json.loads(out.read_text())}
    assert results["verbose"]["items"] == results["compact"]["items"] == 4
    assert results["compact"]["mean_prompt_tokens"] < 0.7 * results["verbose"]["mean_prompt_tokens"]
    assert 0 <= results["compact"]["accuracy"] <= 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "eval",
            "prompts",
            "--data",
            str(tmp_path / "none.jsonl"),
            "--templates",
            str(REPO / "prompts" / "templates"),
            "--variants",
            "capital-qa",
            "--base-url",
            gw.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "cannot read" in bad.stderr
