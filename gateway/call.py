"""The request object of the pipeline: one client request as it moves through the nine steps.

``Call`` is frozen: each stage receives one and returns a new one (``dataclasses.replace``), so
no stage changes what another already looked at, and the client's validated request
(``request``) is never touched. What travels on to the backend is ``body``: the client's JSON
(without ragline's own ``ragline`` object), replaced, never edited, by the stages that change it
(a key's ``max_tokens`` default, redactions, a rendered template).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.auth import Principal
from gateway.backends.base import CHAT, Capabilities, GenerationParams, GenerationRequest
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    RaglineOptions,
)
from gateway.structured import format_key, tools_key

if TYPE_CHECKING:
    from gateway.admission import Ticket
    from gateway.backends.registry import Target
    from gateway.prompting import Shaped
    from gateway.retrieval import Retrieved
    from gateway.safety import Screened


@dataclass(frozen=True)
class Call:
    endpoint: str  # CHAT or COMPLETIONS
    request_id: str
    principal: Principal
    request: ChatCompletionRequest | CompletionRequest  # as the client sent it, validated
    body: Mapping[str, Any]  # what goes on to the backend
    options: RaglineOptions | None = None  # the request's `ragline` object, as screened
    no_cache: bool = False  # Cache-Control: no-cache
    started: float = field(default_factory=time.perf_counter)
    target: Target | None = None  # step 2
    ticket: Ticket | None = None  # step 3: the reservation, settled in step 9
    screened: Screened | None = None  # step 4
    retrieved: Retrieved | None = None  # step 5
    shaped: Shaped | None = None  # step 6
    cache_key: str | None = None  # step 7

    def evolve(self, **changes: Any) -> Call:
        """A new ``Call`` with ``changes``: what ``dataclasses.replace`` does, at a tenth of its
        cost (it re-runs ``__init__``; this copies the fields), on the request path twice."""
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"Call has no field {sorted(unknown)[0]!r}")
        new = object.__new__(Call)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT

    @property
    def model(self) -> str:
        return self.request.model

    def with_body(self, **changes: Any) -> dict[str, Any]:
        """A new body: this one with ``changes`` (``None`` removes a field)."""
        body = dict(self.body)
        for name, value in changes.items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        return body


def message_text(message: Mapping[str, Any]) -> str:
    """A message's content as one string (text parts joined, as OpenAI does)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


def requested_max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens")
    return value if value is not None else body.get("max_tokens")


def check_supported(call: Call, caps: Capabilities) -> None:
    """Refuse what the model's backend cannot honour, before any work (a 400 naming the param)."""
    req = call.request
    if isinstance(req, ChatCompletionRequest):
        fmt = req.response_format
        if fmt is not None and fmt.type != "text" and not caps.json_mode:
            raise UnsupportedParameter(
                f"response_format {fmt.type!r} is not supported by model {req.model!r}; "
                "use 'text'.",
                param="response_format",
            )
        _check_tool_choice(req)
        if req.tools and not caps.tools:
            raise UnsupportedParameter(
                f"tools are not supported by model {req.model!r}.", param="tools"
            )
        if not caps.message_names:
            for i, message in enumerate(req.messages):
                if message.name is not None:
                    raise UnsupportedParameter(
                        "message names are not supported by this model's chat template.",
                        param=f"messages[{i}].name",
                    )
        return
    n = req.n or 1
    if req.best_of not in (None, 1) and req.best_of != n and not caps.best_of:
        raise UnsupportedParameter("best_of is not supported; use n.", param="best_of")
    if req.suffix and not caps.suffix:
        raise UnsupportedParameter("suffix (insertion) is not supported.", param="suffix")
    prompts = req.prompts()
    if not prompts:
        raise InvalidRequest("prompt must not be empty.", param="prompt")
    if req.stream and len(prompts) > 1 and not caps.stream_batches:
        raise UnsupportedParameter("streaming supports one prompt per request.", param="prompt")
    if req.echo and not all(isinstance(p, str) for p in prompts) and not caps.echo_token_ids:
        raise UnsupportedParameter("echo needs text prompts.", param="echo")


def _check_tool_choice(req: ChatCompletionRequest) -> None:
    choice = req.tool_choice
    names = [t.function.name for t in req.tools or ()]
    if choice is not None and choice != "none" and not names:
        raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
    if len(set(names)) != len(names):
        raise InvalidRequest("tools must have distinct function names.", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools.",
            param="tool_choice",
        )


def generation_request(
    call: Call, request_id: str, adapter: str | None, typed: bool = True
) -> GenerationRequest:
    """The backend's view of ``call``: the final body and, when ``typed`` (a backend that does
    not forward the body), the typed fields read from it."""
    body = call.body
    if not typed:
        n = int(body.get("n") or 1)
        return GenerationRequest(
            request_id,
            call.model,
            _DEFAULTS,
            n,
            adapter=adapter,
            body=body,
            path=call.endpoint,
            tenant=call.principal.key_id,
        )
    messages = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    batch: tuple[str | tuple[int, ...], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    if call.chat:
        messages = tuple(_template_message(i, m) for i, m in enumerate(body["messages"]))
        if body.get("tools") and body.get("tool_choice") != "none":
            tools = tuple({"type": "function", "function": t["function"]} for t in body["tools"])
    else:
        raw = body["prompt"]
        prompts: list[Any] = [raw] if isinstance(raw, str) or _is_ids(raw) else list(raw)
        if len(prompts) > 1:
            batch = tuple(p if isinstance(p, str) else tuple(p) for p in prompts)
        elif isinstance(prompts[0], str):
            prompt = prompts[0]
        else:
            prompt_ids = tuple(prompts[0])
    return GenerationRequest(
        request_id=request_id,
        model=call.model,
        params=params_of(body, call.chat),
        n=int(body.get("n") or 1),
        messages=messages,
        tools=tools,
        prompt=prompt,
        prompt_ids=prompt_ids,
        batch=batch,
        echo=bool(body.get("echo")),
        adapter=adapter,
        body=body,
        path=call.endpoint,
        tenant=call.principal.key_id,
    )


_DEFAULTS = GenerationParams()


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def params_of(body: Mapping[str, Any], chat: bool) -> GenerationParams:
    bias: list[tuple[int, float]] = []
    for key, value in (body.get("logit_bias") or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids (integers as strings); got {key!r}",
                param="logit_bias",
            ) from None
    if chat:
        logprobs, top = bool(body.get("logprobs")), int(body.get("top_logprobs") or 0)
    else:
        logprobs, top = body.get("logprobs") is not None, int(body.get("logprobs") or 0)
    stop = body.get("stop")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    return GenerationParams(
        max_tokens=requested_max_tokens(body) if chat else body.get("max_tokens", 16),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        logit_bias=tuple(bias),
        logprobs=logprobs,
        top_logprobs=top,
        ignore_eos=bool(body.get("ignore_eos")),
        min_tokens=int(body.get("min_tokens") or 0),
        response_format=format_key(body.get("response_format")),
        tools=tools_key(body) if chat else None,
    )


def _template_message(i: int, m: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: developer as system; an assistant's tool calls
    with their arguments parsed (templates print them as JSON); a tool result with its id."""
    out: dict[str, Any] = {
        "role": "system" if m["role"] == "developer" else m["role"],
        "content": message_text(m),
    }
    if m.get("tool_calls"):
        calls = []
        for j, c in enumerate(m["tool_calls"]):
            try:
                arguments = json.loads(c["function"]["arguments"] or "{}")
            except ValueError:
                raise InvalidRequest(
                    "The arguments of a tool call must be a JSON object.",
                    param=f"messages[{i}].tool_calls[{j}].function.arguments",
                ) from None
            function = {"name": c["function"]["name"], "arguments": arguments}
            calls.append({"id": c["id"], "type": "function", "function": function})
        out["tool_calls"] = calls
    if m.get("tool_call_id") is not None:
        out["tool_call_id"] = m["tool_call_id"]
    return out
