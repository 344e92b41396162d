"""Metric computations on synthetic timings with known answers."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import LoadSpec, jsonl_prompts, random_prompts
from benchmarks.metrics import SLO, RequestRecord, peak_output_throughput, percentile, summarize
from benchmarks.report import verdict


def record(ttft: float, e2e: float, tokens: int, start: float = 0.0, **kw) -> RequestRecord:  # type: ignore[no-untyped-def]
    gap = (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0
    times = [start + ttft + i * gap for i in range(tokens)]
    return RequestRecord(
        start=start,
        prompt_tokens=10,
        output_tokens=tokens,
        ttft=ttft,
        e2e=e2e,
        itl=[gap] * (tokens - 1),
        chunk_times=times,
        **kw,
    )


def test_percentile_matches_numpy_linear() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(7.6)
    assert percentile(values, 99) == pytest.approx(9.76)
    assert percentile([], 50) == 0.0


def test_tpot_definition() -> None:
    r = record(ttft=0.1, e2e=1.1, tokens=101)
    assert r.tpot == pytest.approx(0.01)  # (1.1 - 0.1) / 100
    assert record(0.1, 0.1, 1).tpot is None


def test_summary_with_known_answers() -> None:
    records = [
        record(0.1, 1.1, 101),
        record(0.3, 2.3, 101, start=0.5),
        RequestRecord(start=0.0, error="HTTP 503"),
    ]
    s = summarize(records, duration=4.0, slo=SLO(ttft_ms=200, tpot_ms=10))
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["total_output_tokens"] == 202
    assert s["output_throughput"] == pytest.approx(50.5)
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["mean_ttft_ms"] == pytest.approx(200)
    assert s["median_ttft_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(15)  # 10 ms and 20 ms
    assert s["median_itl_ms"] == pytest.approx(15)
    assert s["mean_e2el_ms"] == pytest.approx(1700)
    # only the first request meets TTFT ≤ 200 ms and TPOT ≤ 10 ms
    assert s["request_goodput"] == pytest.approx(0.25)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["errors"] == {"HTTP 503": 1}
    assert s["mean_output_tokens_per_s_per_stream"] == pytest.approx((100 + 50) / 2)


def test_peak_throughput_counts_the_busiest_second() -> None:
    a = RequestRecord(start=0, chunk_times=[0.0, 0.1, 0.2, 1.5])
    b = RequestRecord(start=0, chunk_times=[0.05, 0.9, 2.5])
    assert peak_output_throughput([a, b]) == 5


def test_verdict_against_the_goals() -> None:
    fast = summarize([record(0.05, 0.5, 91)], 1.0)
    assert verdict(fast, SLO())["pass"]
    slow = summarize([record(0.5, 5.5, 51)], 6.0)
    checks = verdict(slow, SLO())["checks"]
    assert not checks["median_ttft_ms"]["pass"]
    assert not checks["tokens_per_s_per_stream"]["pass"]
    assert verdict(slow, SLO())["reasons"][0].startswith("median_ttft_ms 500.0 (goal <= 200)")


def test_a_missing_metric_never_passes() -> None:
    """Issue 23, item 2: a run with no completed request had a median TTFT of 0.0, which
    passed; and a non-streamed run has no per-stream rate to judge."""
    failed = summarize([RequestRecord(start=0, error="HTTP 401: no key")], 1.0)
    v = verdict(failed, SLO())
    assert not v["pass"] and v["checks"]["median_ttft_ms"]["missing"]
    assert not v["checks"]["tokens_per_s_per_stream"]["pass"]
    one_token = summarize([record(0.05, 0.06, 1)], 1.0)  # no TPOT from one token
    assert not verdict(one_token, SLO())["checks"]["tokens_per_s_per_stream"]["pass"]
    assert verdict(one_token, SLO(tpot_ms=None))["pass"]


def test_datasets(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = random_prompts(3, input_len=50, output_len=7, tokenizer=tokenizer)
    assert len(prompts) == 3 and all(p.max_tokens == 7 for p in prompts)
    for p in prompts:
        assert abs(len(tokenizer.encode(p.text, add_special_tokens=False)) - 50) <= 2
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "max_tokens": 3}\n\n{"prompt": "b"}\n')
    assert [(p.text, p.max_tokens) for p in jsonl_prompts(path, 9)] == [("a", 3), ("b", 9)]
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        jsonl_prompts(path, 9)


def test_round_robin_models() -> None:
    spec = LoadSpec(base_url="x", model="base", adapters=["a", "b"])
    models = iter(spec.models())
    assert [next(models) for _ in range(5)] == ["a", "b", "a", "b", "a"]


async def test_open_loop_against_the_mock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.loadgen import Prompt, run
    from tests.conftest import start_mock

    mock = start_mock(tmp_path, tokens_per_s=500)
    try:
        spec = LoadSpec(
            base_url=mock.url + "/v1",
            model="smollm2",
            rate=40.0,
            burstiness=0.5,
            num_requests=20,
            warmup=1,
            concurrency=None,
        )
        records, duration = await run(spec, [Prompt("hi", 5)], show_progress=False)
        s = summarize(records, duration)
        assert s["completed"] == 20 and s["failed"] == 0
        assert s["total_output_tokens"] == 100
        assert all(len(r.itl) == 4 for r in records)  # 5 content chunks each
    finally:
        mock.kill()
