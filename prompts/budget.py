"""Token budgets: the served model's chat format, exact prompt token counts, and trimming.

``ChatFormat`` wraps the served model's tokenizer: it renders messages with the model's own chat
template (the text the model will see), counts tokens without adding a second BOS, and folds the
system message into the first user turn when the template has no system role.

``fit`` renders a template and, while the prompt plus ``max_tokens`` does not fit the context
window, drops one item at a time in the template's ``trim_order`` (by default retrieved chunks,
then few-shot examples, then the oldest history) and renders again. The current user message is
never trimmed; if it alone does not fit, the request is refused.
"""

from __future__ import annotations

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
    limit = chat.max_model_len - (max_tokens or 1)
    examples, context, history = list(parts.examples), list(parts.context), list(parts.history)
    trimmed = {"context": 0, "few_shot": 0, "history": 0}
    while True:
        messages = template.render(
            variables,
            history=history,
            examples=examples[::-1],
            context=context,
            system=parts.system,
        )
        messages = chat.normalize(messages)
        tokens = chat.count(messages)
        if tokens <= limit:
            return Rendered(
                messages=messages,
                examples=len(examples),
                context=len(context),
                history=len(history),
                trimmed={k: v for k, v in trimmed.items() if v},
                prompt_tokens=tokens,
            )
        for part in template.spec.budget.trim_order:
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
        else:
            raise PromptError(
                f"the prompt needs {tokens} tokens after trimming everything the template allows "
                f"({', '.join(template.spec.budget.trim_order)}); this model's context is "
                f"{chat.max_model_len} tokens with {max_tokens or 1} reserved for the completion",
                param="messages",
            )
