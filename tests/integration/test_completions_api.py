"""Text completions (``/v1/completions``) through a real gateway with the ``openai`` SDK."""

from __future__ import annotations

MODEL = "smollm2"


def test_completion(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_default_max_tokens_is_16(client) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_completion_stream_echo_and_usage(client) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            echo=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_batch_prompts_and_token_ids(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = ["The capital of France is", "Two plus two equals"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=5, temperature=0)
    assert r.choices[2].text == single.choices[0].text
    ids = tokenizer.encode(prompts[1])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == single.choices[0].text


def test_completion_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
