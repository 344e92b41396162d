"""Constrained decoding for the embedded engine: a JSON schema becomes an llguidance grammar, and
each constrained sequence masks the logits at every step to the tokens the grammar allows.

``Grammars.compile`` turns a request's ``response_format`` (its canonical JSON) into a checked
grammar once; later requests with the same format reuse it (an LRU). A schema llguidance cannot
enforce is a 400 naming ``response_format``. Each sequence gets its own ``GrammarMatcher`` (the
parser state); the mask is computed into a bit vector by llguidance's Rust code (the GIL is
released) and applied to that sequence's row of logits only, so constrained and unconstrained
sequences share a decode step. JSON is generated without free whitespace (``", "`` and ``": "``
between items): a small model given free whitespace can fill ``max_tokens`` with newlines.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gateway.structured import JSON_OPTIONS, call_schema, check_schema, invalid, schema_of


@dataclass(frozen=True)
class Grammar:
    """A checked grammar for one model's tokenizer; ``matcher()`` starts a sequence on it."""

    tokenizer: Any  # llguidance.LLTokenizer
    text: str
    vocab_size: int

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """The parser state of one sequence: masks its logits, then consumes its chosen token."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
        if self._matcher.is_error():
            raise ValueError(self._matcher.get_error())
        self._words = np.zeros((grammar.vocab_size + 31) // 32, dtype=np.int32)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place."""
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")
        size = logits.shape[-1]
        blocked = torch.from_numpy(allowed[:size] == 0)
        if blocked.shape[0] < size:  # rows past the tokenizer's vocabulary: never allowed
            logits[blocked.shape[0] :] = float("-inf")
            logits = logits[: blocked.shape[0]]
        logits.masked_fill_(blocked, float("-inf"))

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_stopped())


class Grammars:
    """Compiled grammars of one model (its tokenizer loaded once, ~1 s, on first use)."""

    def __init__(
        self, hf_tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], size: int = 256
    ) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._size = size
        self.compiled = 0  # grammars built (not found in the cache): for tests and metrics

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self._vocab_size, eos_token=self._eos_ids
                )
            return self._tokenizer

    def cached(self, key: str) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
            return grammar

    def compile(self, response_format: str | None, tools: str | None = None) -> Grammar:
        """``response_format``: the canonical JSON of a json_object / json_schema format;
        ``tools``: ``gateway.structured.tools_key``'s. Raises ``InvalidRequest``."""
        key = f"{response_format}\n{tools}"
        grammar = self.cached(key)
        if grammar is not None:
            return grammar
        import llguidance

        fmt = json.loads(response_format) if response_format else None
        try:
            if tools is not None:
                text = llguidance.LLMatcher.grammar_from_lark(tools_lark(json.loads(tools), fmt))
            else:
                schema = schema_of(fmt or {})
                check_schema(schema)
                text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        tokenizer = self._ll_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise invalid(messages[0] if messages else "the schema cannot be enforced")
        grammar = Grammar(tokenizer, text, self._vocab_size)
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return grammar


def tools_lark(spec: dict[str, Any], response_format: dict[str, Any] | None) -> str:
    """A Lark grammar (llguidance's dialect, JSON schemas inline) for a tool-calling answer:
    ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, one or several, and for
    ``auto`` the alternative of a plain answer (any text not starting with ``<``, or JSON under
    the response format when the request has one)."""
    call = json.dumps(call_schema(spec["functions"], spec["choice"]))
    calls = 'call ("\\n" call)*' if spec["parallel"] else "call"
    rules = [
        f"calls: {calls}",
        'call: "<tool_call>\\n" body "\\n</tool_call>"',
        f"body: %json {call}",
    ]
    if spec["choice"] != "auto":
        return "\n".join(["start: calls", *rules])
    if response_format is not None:
        answer = json.dumps({**schema_of(response_format), "x-guidance": JSON_OPTIONS})
        rules.append(f"text: %json {answer}")
    else:
        rules.append("text: TEXT")
        rules.append(r"TEXT: /[^<][\s\S]*/")
    return "\n".join(["start: calls | text", *rules])
