"""Training data: chat or Alpaca JSONL → checked conversations → tokens, assistant-only labels.

Formats (one JSON object per line; the format is detected per line):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` with at
  least one assistant turn;
- Alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional), turned
  into a user turn and an assistant turn.

Every problem names the file and line. Conversations are rendered with the base model's own chat
template; only the tokens of assistant turns (their text and the end-of-turn marker) carry labels,
everything else is ``-100``. The train/eval split is decided by a hash of each example's content,
so it does not depend on the order of the file or on a seed. Packing is optional.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The dataset cannot be used; the message names the file and line."""


@dataclass
class Example:
    messages: list[dict[str, str]]
    line: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, sort_keys=True).encode()).hexdigest()


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    line: int


@dataclass
class Summary:
    examples: int = 0
    train: int = 0
    eval: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    truncated: int = 0
    packed_sequences: int | None = None
    checksum: str = ""
    duplicates: int = 0  # lines whose content repeats an earlier line (they split together)
    augmented: int = 0  # reworded copies added to the training examples (--augment)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["mean_length"] = round(self.tokens / self.examples, 1) if self.examples else 0
        return out


def load_examples(path: Path) -> tuple[list[Example], str]:
    """Parse and validate the file; returns the examples and the file's SHA-256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    checksum = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        examples.append(Example(_messages(obj, where), number))
    if not examples:
        raise DataError(f"{path}: the dataset is empty (no JSON lines)")
    return examples, checksum


def _messages(obj: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content"}:
                raise DataError(f"{where}: messages[{i}] must have exactly 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
            if not isinstance(content, str) or not content.strip():
                raise DataError(f"{where}: messages[{i}].content must be a non-empty string")
            if role == "system" and i != 0:
                raise DataError(f"{where}: messages[{i}]: a system message must come first")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message: nothing to learn from")
        return out
    if "instruction" in obj or "output" in obj:
        unknown = set(obj) - {"instruction", "input", "output", "system"}
        if unknown:
            raise DataError(f"{where}: unknown Alpaca field(s): {', '.join(sorted(unknown))}")
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{where}: Alpaca '{key}' must be a non-empty string")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{where}: Alpaca 'input' must be a string")
        user = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            out.insert(0, {"role": "system", "content": obj["system"]})
        return out
    raise DataError(
        f"{where}: unknown format: expected 'messages' (chat) or 'instruction'/'output' (Alpaca)"
    )


# Below this many distinct examples an eval split removes whole facts from training (each
# distinct example may be the only one that teaches its fact), so the default is no eval split.
MIN_EVAL_DISTINCT = 100
DEFAULT_EVAL_FRACTION = 0.1


@dataclass
class Split:
    train: list[Example]
    held: list[Example]
    fraction: float  # what was applied
    duplicates: int  # lines that repeat an earlier line's content
    warnings: list[str]


def split(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic: an example goes to eval when its content hash falls under the fraction,
    so identical copies always land on the same side."""
    if not 0 <= eval_fraction < 1:
        raise DataError("eval fraction must be in [0, 1)")
    train: list[Example] = []
    held: list[Example] = []
    for ex in examples:
        point = int(ex.digest()[:8], 16) / 16**8
        (held if point < eval_fraction else train).append(ex)
    if eval_fraction > 0 and not held and len(train) > 1:
        held.append(train.pop())  # a tiny set still gets one eval example
    if not train:
        raise DataError("no training examples left after the eval split")
    return train, held


def choose_split(examples: list[Example], eval_fraction: float | None) -> Split:
    """The eval split that never silently removes whole examples from training.

    ``None`` (the default): ``DEFAULT_EVAL_FRACTION`` when there are at least
    ``MIN_EVAL_DISTINCT`` distinct examples, else no eval split, with a warning saying so. An
    explicit fraction is applied as asked; on a small set the warning names how many distinct
    examples (and their copies) are then never trained on."""
    distinct = len({ex.digest() for ex in examples})
    duplicates = len(examples) - distinct
    warnings: list[str] = []
    if eval_fraction is None:
        if distinct < MIN_EVAL_DISTINCT:
            warnings.append(
                f"{distinct} distinct examples (under {MIN_EVAL_DISTINCT}): no eval split, every "
                "example is trained; pass --eval-fraction to hold some out anyway"
            )
            return Split(list(examples), [], 0.0, duplicates, warnings)
        eval_fraction = DEFAULT_EVAL_FRACTION
    train, held = split(examples, eval_fraction)
    held_distinct = len({ex.digest() for ex in held})
    if held and distinct < MIN_EVAL_DISTINCT:
        warnings.append(
            f"--eval-fraction {eval_fraction}: {held_distinct} of {distinct} distinct examples "
            f"({len(held)} lines with their copies) are held out and never trained on"
        )
    return Split(train, held, eval_fraction, duplicates, warnings)


def tokenize(example: Example, tokenizer: Any) -> Tokenized:
    """Render with the chat template; label only assistant turns (and their end-of-turn)."""
    messages = example.messages
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(start) or not text.startswith(end):
            raise DataError(
                f"line {example.line}: the chat template does not render conversations "
                "prefix-stably; assistant turns cannot be located"
            )
        spans.append((len(start), len(end.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(a <= begin < b for a, b in spans)
        labels.append(token if inside else IGNORE)
    return Tokenized(list(enc["input_ids"]), labels, example.line)


def prepare(
    examples: list[Example],
    tokenizer: Any,
    max_length: int,
    *,
    truncate: bool = False,
    context_limit: int | None = None,
    path: Path | None = None,
) -> tuple[list[Tokenized], Summary]:
    """Tokenize all examples; too long is an error (naming lines) unless ``truncate``."""
    out, summary = [], Summary()
    too_long = []
    for ex in examples:
        tok = tokenize(ex, tokenizer)
        n = len(tok.input_ids)
        if context_limit is not None and n > context_limit:
            raise DataError(
                f"{path or 'dataset'}:{ex.line}: {n} tokens, longer than the model's context "
                f"({context_limit})"
            )
        if n > max_length:
            if not truncate:
                too_long.append((ex.line, n))
                continue
            tok = Tokenized(tok.input_ids[:max_length], tok.labels[:max_length], ex.line)
            summary.truncated += 1
        if all(label == IGNORE for label in tok.labels):
            raise DataError(
                f"{path or 'dataset'}:{ex.line}: no assistant tokens left within {max_length} "
                "tokens"
            )
        out.append(tok)
        summary.examples += 1
        summary.tokens += len(tok.input_ids)
        summary.trained_tokens += sum(1 for label in tok.labels if label != IGNORE)
        summary.max_length = max(summary.max_length, len(tok.input_ids))
    if too_long:
        shown = ", ".join(f"line {line} ({n} tokens)" for line, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise DataError(
            f"{path or 'dataset'}: {len(too_long)} example(s) longer than --max-length "
            f"{max_length}: {shown}{more}; raise --max-length or pass --truncate"
        )
    return out, summary


def pack(rows: list[Tokenized], max_length: int, eos_id: int) -> list[Tokenized]:
    """Concatenate examples (separated by EOS) into blocks of ``max_length`` tokens.

    Attention is not masked between packed examples (as in TRL's basic packing); use it for many
    short examples, where it removes most padding.
    """
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        ids += row.input_ids + [eos_id]
        labels += row.labels + [IGNORE]
    return [
        Tokenized(ids[i : i + max_length], labels[i : i + max_length], 0)
        for i in range(0, len(ids), max_length)
        if any(label != IGNORE for label in labels[i : i + max_length])
    ]
