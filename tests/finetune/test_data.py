"""Dataset parsing, validation (naming the line), assistant-only labels and the split, with the
real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finetune.data import (
    DEFAULT_EVAL_FRACTION,
    IGNORE,
    DataError,
    Example,
    choose_split,
    load_examples,
    pack,
    prepare,
    split,
    tokenize,
)

# a hash of the held-out part of the synthetic 200-row set below
PINNED_SPLIT = "c139937908f2250a"


def write(tmp_path: Path, lines: list[object] | str) -> Path:
    path = tmp_path / "data.jsonl"
    text = lines if isinstance(lines, str) else "\n".join(json.dumps(x) for x in lines)
    path.write_text(text)
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def test_chat_and_alpaca_lines_load(tmp_path: Path) -> None:
    examples, checksum = load_examples(write(tmp_path, [CHAT, ALPACA]))
    assert len(checksum) == 64
    assert examples[1].messages == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"messages": []}), "non-empty list"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "role must be one of"),
        (json.dumps({"messages": [{"role": "user", "content": ""}]}), "non-empty string"),
        (json.dumps({"instruction": "x"}), "Alpaca 'output'"),
        (json.dumps({"instruction": "x", "output": "y", "extra": 1}), "unknown Alpaca field"),
        (json.dumps({"prompt": "x", "completion": "y"}), "unknown format"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, line: str, needle: str) -> None:
    path = write(tmp_path, json.dumps(ALPACA) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"{path}:3:" in str(err.value) and needle in str(err.value)


def test_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        load_examples(write(tmp_path, "\n\n"))


def test_only_assistant_tokens_are_labelled(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = tokenize(Example(CHAT["messages"], 1), tokenizer)  # type: ignore[arg-type]
    labelled = [t for t, lab in zip(tok.input_ids, tok.labels, strict=True) if lab != IGNORE]
    text = tokenizer.decode(labelled)
    assert text == "Hello there.<|im_end|>Blue.<|im_end|>"
    # everything before the first answer (system, user, the assistant header) is masked
    first = tok.labels.index(next(lab for lab in tok.labels if lab != IGNORE))
    assert tokenizer.decode(tok.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_split_is_deterministic_and_order_free(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(200)]
    examples, _ = load_examples(write(tmp_path, rows))
    train, held = split(examples, 0.2)
    assert 20 < len(held) < 60 and len(train) + len(held) == 200
    train2, held2 = split(list(reversed(examples)), 0.2)
    assert {e.digest() for e in held} == {e.digest() for e in held2}
    _, tiny_eval = split(examples[:2], 0.01)
    assert len(tiny_eval) == 1  # a tiny set still gets one eval example


def test_long_examples_fail_or_truncate(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [ALPACA, {"instruction": "word " * 300, "output": "ok"}]
    examples, _ = load_examples(write(tmp_path, rows))
    with pytest.raises(DataError, match=r"longer than --max-length 64: line 2 \(3\d\d tokens\)"):
        prepare(examples, tokenizer, 64, path=tmp_path / "data.jsonl")
    with pytest.raises(DataError, match="longer than the model's context"):
        prepare(examples, tokenizer, 4096, context_limit=128, path=tmp_path / "data.jsonl")
    # truncating the long one leaves it no assistant tokens: refused, not trained on silently
    with pytest.raises(DataError, match="no assistant tokens left"):
        prepare(examples, tokenizer, 64, truncate=True)
    rows, summary = prepare(examples[:1], tokenizer, 64)
    assert summary.examples == 1 and summary.trained_tokens == 2  # "5" and <|im_end|>


def test_packing_fills_blocks(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples, _ = load_examples(write(tmp_path, [ALPACA] * 10))
    rows, _ = prepare(examples, tokenizer, 256)
    packed = pack(rows, 128, tokenizer.eos_token_id)
    assert sum(len(r.input_ids) for r in packed) == sum(len(r.input_ids) + 1 for r in rows)
    assert all(len(r.input_ids) <= 128 for r in packed) and len(packed) < len(rows)


def test_a_small_set_is_not_split_by_default_and_says_so(tmp_path: Path) -> None:
    """20 facts with three identical copies each: a hash split would hold out every copy of a
    few facts, which then are never trained; by default nothing is held out, with a warning."""
    rows = [{"instruction": f"fact {i}?", "output": f"answer {i}"} for i in range(20)] * 3
    examples, _ = load_examples(write(tmp_path, rows))
    chosen = choose_split(examples, None)
    assert chosen.held == [] and len(chosen.train) == 60 and chosen.fraction == 0
    assert chosen.duplicates == 40
    assert chosen.warnings and "20 distinct examples" in chosen.warnings[0]
    explicit = choose_split(examples, 0.3)  # asked for: applied, and the loss is named
    held = {e.digest() for e in explicit.held}
    assert held and not held & {e.digest() for e in explicit.train}  # copies stay together
    assert f"{len(held)} of 20 distinct examples" in explicit.warnings[0]


def test_a_large_set_gets_the_default_split_and_it_is_pinned(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(200)]
    examples, _ = load_examples(write(tmp_path, rows + rows[:50]))  # 50 duplicated lines
    chosen = choose_split(examples, None)
    assert chosen.fraction == DEFAULT_EVAL_FRACTION and not chosen.warnings
    assert chosen.duplicates == 50
    held = sorted({e.digest() for e in chosen.held})
    assert not set(held) & {e.digest() for e in chosen.train}
    # the split of this set, pinned: a change to how examples are assigned shows up here
    assert hashlib.sha256("".join(held).encode()).hexdigest()[:16] == PINNED_SPLIT


def test_augmented_copies_reword_the_question_and_only_training_examples(
    tmp_path: Path,
    tokenizer,  # type: ignore[no-untyped-def]
    model_path: Path,
) -> None:
    from finetune.augment import augment
    from finetune.train import TrainConfig, load_data

    examples, _ = load_examples(write(tmp_path, [CHAT, ALPACA]))
    copies = augment(examples, 4, seed=0)
    assert len(copies) == 8
    for copy in copies:
        source = examples[copy.line - 1]
        # the last user turn is reworded, everything else (the answers) is as written
        assert copy.messages[:-2] == source.messages[:-2]
        assert copy.messages[-1] == source.messages[-1]
        assert copy.messages[-2]["content"] != source.messages[-2]["content"]
    assert len({c.messages[-2]["content"] for c in copies[:4]}) == 4  # distinct rewordings
    assert augment(examples, 4, seed=0) == copies  # deterministic
    # a held-out example is never copied into training
    rows = [{"instruction": f"Question number {i}?", "output": f"a{i}"} for i in range(200)]
    data = write(tmp_path, rows)
    config = TrainConfig(base=model_path, data=data, output=tmp_path / "out", augment=3)
    train, held, summary = load_data(config, tokenizer, 2048)
    assert summary.augmented == 3 * len(train) // 4 and summary.eval == len(held) > 0
    held_lines = {r.line for r in held}
    assert not held_lines & {r.line for r in train}
