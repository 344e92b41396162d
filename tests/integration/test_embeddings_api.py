"""``/v1/embeddings`` through a real gateway, with the ``openai`` SDK and LangChain's
``OpenAIEmbeddings``: vectors equal to sentence-transformers' for the same model, every input
shape OpenAI accepts (cl100k_base token ids included, what LangChain sends), both encodings,
usage, the key's model policy, RPM, the cache and a 400 naming the parameter for each bad input."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, stop_gateway

MODEL = "all-MiniLM-L6-v2"
FULL, CHAT_ONLY, SLOW = "sk-emb-full-1234", "sk-emb-chat-1234", "sk-emb-slow-1234"
OTHER = "sk-emb-other-1234"
TEXTS = [
    "The mitochondria is the powerhouse of the cell.",
    "Vitamin D deficiency is linked to bone loss.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("embeddings")
    keys = [
        {"id": "emb-full", "sha256": hash_key(FULL), "policy": {"models": ["*"]}},
        {"id": "emb-chat", "sha256": hash_key(CHAT_ONLY), "policy": {"models": ["smollm2"]}},
        {"id": "emb-slow", "sha256": hash_key(SLOW), "policy": {"models": ["*"], "rpm": 2}},
        {"id": "emb-other", "sha256": hash_key(OTHER)},
    ]
    gateway = start_gateway(
        tmp,
        models=[{"name": "smollm2"}],
        keys=keys,
        env={"RAGLINE_ADMIN_KEY": "sk-emb-admin-1234"},
    )
    yield gateway
    stop_gateway(gateway)


def sdk(gw: Gateway, key: str = FULL) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference() -> object:
    """sentence-transformers itself, on the packaged model: what the vectors must equal."""
    from sentence_transformers import SentenceTransformer

    from rag.embeddings import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


def expected(reference: object, texts: list[str]) -> np.ndarray:
    return np.asarray(reference.encode(texts, normalize_embeddings=True))  # type: ignore[attr-defined]


def assert_same(got: list[list[float]], want: np.ndarray) -> None:
    vectors = np.asarray(got, dtype=np.float32)
    assert vectors.shape == want.shape
    cosines = (vectors * want).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosines.min() > 0.9999, cosines


def test_strings_match_sentence_transformers_in_both_encodings(
    gw: Gateway, reference: object
) -> None:
    client = sdk(gw)
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    assert default.model == MODEL and default.object == "list"
    assert_same([d.embedding for d in default.data], expected(reference, TEXTS))
    np.testing.assert_allclose(
        [d.embedding for d in default.data], [d.embedding for d in floats.data], atol=1e-6
    )
    tokenizer = reference.tokenizer  # type: ignore[attr-defined]
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert default.usage.prompt_tokens == tokens == default.usage.total_tokens

    single = client.embeddings.create(model=MODEL, input=TEXTS[2], dimensions=384)
    assert len(single.data) == 1
    assert_same([single.data[0].embedding], expected(reference, TEXTS[2:]))


def test_cl100k_token_ids_are_read_as_the_text_they_encode(gw: Gateway, reference: object) -> None:
    from gateway.embeddings import cl100k_base

    encoding = cl100k_base()
    ids = [encoding.encode(t) for t in TEXTS]
    client = sdk(gw)
    many = client.embeddings.create(model=MODEL, input=ids)
    assert_same([d.embedding for d in many.data], expected(reference, TEXTS))
    one = client.embeddings.create(model=MODEL, input=ids[0])
    assert_same([one.data[0].embedding], expected(reference, TEXTS[:1]))


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's side of LangChain's default: tiktoken loads cl100k_base from its cache
    directory (this machine cannot download it); the file is the one tiktoken publishes."""
    source = resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    name = hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache file name
    with resources.as_file(source) as path:
        shutil.copy(path, tmp_path / name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


@pytest.mark.usefixtures("tiktoken_cache")
def test_langchain_openai_embeddings_unmodified(gw: Gateway, reference: object) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=MODEL, base_url=gw.base_url, api_key=FULL)  # type: ignore[arg-type]
    documents = embeddings.embed_documents(TEXTS)  # cl100k token ids, base64
    assert_same(documents, expected(reference, TEXTS))
    query = embeddings.embed_query("Where is the capital of France?")
    assert_same([query], expected(reference, ["Where is the capital of France?"]))
    # nearest document by the gateway's vectors is the one about France
    assert int(np.argmax(np.asarray(documents) @ np.asarray(query))) == 2


def test_long_inputs_are_refused_unless_truncation_is_asked_for(
    gw: Gateway, reference: object
) -> None:
    long_text = " ".join(["retrieval augmented generation"] * 150)  # ~450 tokens
    client = sdk(gw)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=["short", long_text])
    error = info.value.body
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"
    assert "input[1]" in error["message"] and "256" in error["message"]
    kept = client.embeddings.create(
        model=MODEL, input=long_text, extra_body={"truncate_prompt_tokens": -1}
    )
    # sentence-transformers truncates at the same 256 tokens
    assert_same([kept.data[0].embedding], expected(reference, [long_text]))
    assert kept.usage.prompt_tokens == 256


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[15339, 100265]]}, "input"),  # 100265 is no cl100k_base token
        ({"input": [-1]}, "input"),
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "extra_body": {"truncate_prompt_tokens": 1000}}, "truncate_prompt_tokens"),
        ({"input": "x", "extra_body": {"pooling": "cls"}}, "pooling"),
        ({"input": ["x"] * 2049}, "input"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    gw: Gateway, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).embeddings.create(model=MODEL, **kwargs)  # type: ignore[arg-type]
    assert info.value.body["param"] == param, info.value.body
    assert info.value.body["type"] == "invalid_request_error"


def test_models_keys_and_limits(gw: Gateway) -> None:
    listed = {m.id for m in sdk(gw).models.list()}
    assert MODEL in listed and "smollm2" in listed
    assert MODEL not in {m.id for m in sdk(gw, CHAT_ONLY).models.list()}
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(gw, CHAT_ONLY).embeddings.create(model=MODEL, input="hello")
    assert denied.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as chat_model:  # a chat model embeds nothing
        sdk(gw).embeddings.create(model="smollm2", input="hello")
    assert chat_model.value.body["param"] == "model" and MODEL in chat_model.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, "sk-nobody-1234").embeddings.create(model=MODEL, input="hello")

    slow = sdk(gw, SLOW)
    for word in ("one", "two"):
        slow.embeddings.create(model=MODEL, input=word)
    with pytest.raises(openai.RateLimitError):
        slow.embeddings.create(model=MODEL, input="three")


def test_cache_and_metrics(gw: Gateway) -> None:
    client = sdk(gw)
    text = f"cached sentence {np.random.default_rng().integers(1 << 30)}"
    first = client.embeddings.with_raw_response.create(model=MODEL, input=text)
    second = client.embeddings.with_raw_response.create(model=MODEL, input=text)
    assert first.headers["x-ragline-cache"] == "miss"
    assert second.headers["x-ragline-cache"] == "hit"
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert second.parse().usage.prompt_tokens == first.parse().usage.prompt_tokens > 0
    # another key sending the same text is not told that it was embedded before
    other = sdk(gw, OTHER).embeddings.with_raw_response.create(model=MODEL, input=text)
    assert other.headers["x-ragline-cache"] == "miss"

    import httpx

    metrics = httpx.get(
        gw.url + "/metrics", headers={"Authorization": "Bearer sk-emb-admin-1234"}
    ).text
    line = next(
        (
            m
            for m in metrics.splitlines()
            if m.startswith("ragline_requests_total")
            and 'route="/v1/embeddings"' in m
            and 'key="emb-full"' in m
            and 'status="200"' in m
        ),
        None,
    )
    assert line is not None and float(line.rsplit(" ", 1)[1]) >= 2, [
        m for m in metrics.splitlines() if "embeddings" in m or "requests_total" in m
    ][:20]
