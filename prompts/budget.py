"""Token budgets: the served model's chat format, exact prompt token counts, and trimming.

``ChatFormat`` wraps the served model's tokenizer: it renders messages with the model's own chat
template (the text the model will see), counts tokens without adding a second BOS, and folds the
system message into the first user turn when the template has no system role.

``fit`` renders a template with the fewest items dropped, in the template's ``trim_order`` (by
default retrieved chunks, then few-shot examples, then the oldest history), after which the
prompt plus ``max_tokens`` fits the context window (found by binary search over the number of
drops). The current user message is never trimmed; if it alone does not fit, the request is
refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prompts.template import Example, PromptError, Rendered, Template

_PROBE = "ragline-system-probe"


class ChatFormat:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.supports_system = self._probe_system()
        bos = getattr(tokenizer, "bos_token", None)
        self._bos = bos if isinstance(bos, str) and bos else None

    def _probe_system(self) -> bool:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}],
                tokenize=False,
            )
        except Exception:  # templates raise (Jinja's raise_exception) when they refuse a role
            return False
        return _PROBE in str(text)

    def normalize(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Messages this model's chat template accepts (system folded in where unsupported)."""
        if self.supports_system or not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], messages[1:]
        if rest and rest[0]["role"] == "user":
            merged = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
            return [merged, *rest[1:]]
        return [{"role": "user", "content": system}, *rest]

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                self.normalize(messages), tokenize=False, add_generation_prompt=True
            )
        )

    def count(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens exactly as the backend will count them (the text already holds any BOS
        the chat template writes, so the tokenizer must not add another)."""
        return len(self.tokenizer.encode(self.prompt_text(messages), add_special_tokens=False))

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Parts:
    """What may be trimmed, each list in priority order (the item dropped first is last)."""

    examples: list[Example]
    context: list[dict[str, Any]]
    history: list[dict[str, str]]  # oldest first; trimmed from the front
    system: str | None = None  # the client's own system text, added to the template's


def fit(
    template: Template,
    variables: dict[str, Any],
    parts: Parts,
    chat: ChatFormat,
    max_tokens: int | None,
) -> Rendered:
    """Render with as much as fits: the fewest drops, in the template's ``trim_order``, after
    which the prompt plus ``max_tokens`` fits the context. Dropping only ever shortens the
    prompt, so the fewest drops is found by binary search: a few renders whatever the length
    of the history, not one per dropped item (which made a long history quadratic)."""
    limit = chat.max_model_len - (max_tokens or 1)
    order = template.spec.budget.trim_order

    def attempt(drops: int) -> tuple[Rendered, int]:
        examples, context, history, trimmed = _dropped(parts, order, drops)
        messages = template.render(
            variables, history=history, examples=examples[::-1], context=context,
            system=parts.system,
        )  # fmt: skip
        messages = chat.normalize(messages)
        tokens = chat.count(messages)
        rendered = Rendered(
            messages=messages,
            examples=len(examples),
            context=len(context),
            history=len(history),
            trimmed={k: v for k, v in trimmed.items() if v},
            prompt_tokens=tokens,
        )
        return rendered, tokens

    whole, tokens = attempt(0)
    if tokens <= limit:
        return whole
    most = _droppable(parts, order)
    least, tokens = attempt(most)
    if tokens > limit:
        raise PromptError(
            f"the prompt needs {tokens} tokens after trimming everything the template allows "
            f"({', '.join(order)}); this model's context is "
            f"{chat.max_model_len} tokens with {max_tokens or 1} reserved for the completion",
            param="messages",
        )
    low, high, best = 0, most, least  # attempt(low) does not fit, attempt(high) does
    while high - low > 1:
        middle = (low + high) // 2
        rendered, tokens = attempt(middle)
        if tokens <= limit:
            high, best = middle, rendered
        else:
            low = middle
    return best


def _dropped(
    parts: Parts, order: Sequence[str], drops: int
) -> tuple[list[Example], list[dict[str, Any]], list[dict[str, str]], dict[str, int]]:
    """What is left after ``drops`` drops, each from the first part of ``order`` that has an
    item: the last context chunk, the last few-shot example, or the oldest history turn (with
    the answers that would then open the history)."""
    examples, context, history = list(parts.examples), list(parts.context), list(parts.history)
    trimmed = {"context": 0, "few_shot": 0, "history": 0}
    for _ in range(drops):
        for part in order:
            if part == "context" and context:
                context.pop()
            elif part == "few_shot" and examples:
                examples.pop()
            elif part == "history" and history:
                history.pop(0)
                while history and history[0]["role"] == "assistant":
                    history.pop(0)  # never start the history with an answer to nothing
                    trimmed["history"] += 1
            else:
                continue
            trimmed[part] += 1
            break
    return examples, context, history, trimmed


def _droppable(parts: Parts, order: Sequence[str]) -> int:
    """How many drops there are before nothing ``order`` names is left."""
    count = 0
    if "context" in order:
        count += len(parts.context)
    if "few_shot" in order:
        count += len(parts.examples)
    if "history" in order:
        history = list(parts.history)
        while history:
            history.pop(0)
            while history and history[0]["role"] == "assistant":
                history.pop(0)
            count += 1
    return count
