"""A fast OpenAI-compatible fake upstream, for isolating the gateway's own cost and for faults.

    python -m benchmarks.mock_upstream --port 9100 [--ttft-ms 50] [--tokens-per-s 100]
                                        [--output-tokens 16] [--model smollm2]

It answers ``/v1/chat/completions`` and ``/v1/completions`` (JSON and SSE, with usage),
``/v1/models``, ``/health``, ``/metrics`` (``vllm:num_requests_running``, as vLLM names it) and
vLLM's ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``. Each completion is
``max_tokens`` (or ``--output-tokens``) copies of the word `` tok``, the first after
``--ttft-ms`` and the rest at ``--tokens-per-s`` (0: no delay). It is a bare ASGI app on uvicorn:
no framework, so that it costs far less than whatever it is measured against. Never use it to
stand in for a feature: it generates nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send


@dataclass
class MockConfig:
    model: str = "smollm2"
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    output_tokens: int = 16
    prompt_tokens: int = 10
    reply: str | None = None  # answer this text (in 6-character pieces when streaming)
    echo: bool = False  # answer the last message (the prompt) back, in 6-character pieces
    finish: str = "length"  # the finish_reason of every answer
    tool_call: str | None = None  # chat: answer as a call to this function, ``reply`` its arguments

    def pieces(self, n_tokens: int, data: dict[str, Any] | None = None) -> list[str]:
        reply = self.reply
        if self.echo and data is not None:
            messages = data.get("messages") or [{"content": data.get("prompt", "")}]
            reply = str(messages[-1].get("content") or "")
        if reply is None:
            return [" tok"] * n_tokens
        return [reply[i : i + 6] for i in range(0, len(reply), 6)]


@dataclass
class MockState:
    running: int = 0
    requests: int = 0
    lora_loads: int = 0
    adapters: set[str] = field(default_factory=set)


class MockUpstream:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.state = MockState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            await self._get(path, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        data = json.loads(body or b"{}")
        if path in ("/v1/chat/completions", "/v1/completions"):
            await self._complete(path, data, send, receive)
        elif path == "/v1/load_lora_adapter":
            self.state.adapters.add(data["lora_name"])
            self.state.lora_loads += 1
            await _respond(send, 200, b"Success", b"text/plain")
        elif path == "/v1/unload_lora_adapter":
            self.state.adapters.discard(data["lora_name"])
            await _respond(send, 200, b"Success", b"text/plain")
        else:
            await _respond(send, 404, b'{"error": {"message": "not found"}}')

    async def _get(self, path: str, send: Send) -> None:
        if path == "/health":
            await _respond(send, 200, b"")
        elif path == "/v1/models":
            names = [self.config.model, *sorted(self.state.adapters)]
            data = [{"id": n, "object": "model", "created": 0, "owned_by": "mock"} for n in names]
            await _respond(send, 200, json.dumps({"object": "list", "data": data}).encode())
        elif path == "/metrics":
            text = f"vllm:num_requests_running {self.state.running}\n"
            text += f"mock_requests_total {self.state.requests}\n"
            text += f"mock_lora_loads_total {self.state.lora_loads}\n"
            await _respond(send, 200, text.encode(), b"text/plain")
        else:
            await _respond(send, 404, b'{"error": {"message": "not found"}}')

    async def _complete(
        self, path: str, data: dict[str, Any], send: Send, receive: Receive
    ) -> None:
        model = data.get("model", self.config.model)
        if model != self.config.model and model not in self.state.adapters:
            body: dict[str, Any] = {
                "error": {
                    "message": f"The model `{model}` does not exist.",
                    "type": "NotFoundError",
                    "param": "model",
                    "code": 404,
                }
            }
            await _respond(send, 404, json.dumps(body).encode())
            return
        chat = path.endswith("chat/completions")
        n_tokens = int(
            data.get("max_completion_tokens") or data.get("max_tokens") or self.config.output_tokens
        )
        self.state.requests += 1
        self.state.running += 1
        try:
            if data.get("stream"):
                await self._stream(chat, model, n_tokens, data, send, receive)
            else:
                await self._wait(
                    self.config.ttft_ms / 1000 + _gap(self.config.tokens_per_s) * (n_tokens - 1)
                )
                pieces = self.config.pieces(n_tokens, data)
                text, n_tokens = "".join(pieces), len(pieces)
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if self.config.tool_call:
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [_call(self.config.tool_call, text)],
                    }
                choice: dict[str, Any] = (
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": self.config.finish,
                    }
                    if chat
                    else {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": self.config.finish,
                    }
                )
                body = {
                    "id": _id(chat),
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(self.config.prompt_tokens, n_tokens),
                }
                await _respond(send, 200, json.dumps(body).encode())
        finally:
            self.state.running -= 1

    async def _stream(
        self,
        chat: bool,
        model: str,
        n_tokens: int,
        data: dict[str, Any],
        send: Send,
        receive: Receive,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        rid, created = _id(chat), int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def emit(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        # like vLLM, the role event goes out with the first token, after the TTFT
        await self._wait(self.config.ttft_ms / 1000)
        if chat:
            await emit(
                event(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        gap = _gap(self.config.tokens_per_s)
        pieces = self.config.pieces(n_tokens, data)
        n_tokens = len(pieces)
        for i in range(n_tokens):
            if i:
                await self._wait(gap)
            last = i == n_tokens - 1
            finish = self.config.finish if last else None
            delta: dict[str, Any] = {"content": pieces[i]}
            if self.config.tool_call:  # a header delta first, then the arguments in pieces
                call = _call(self.config.tool_call, "") if i == 0 else {}
                delta = {"tool_calls": [{"index": 0, **call, "function": {"arguments": pieces[i]}}]}
                if i == 0:
                    delta["tool_calls"][0]["function"]["name"] = self.config.tool_call
            choice = (
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": pieces[i], "logprobs": None, "finish_reason": finish}
            )
            await emit(event([choice]))
        if include_usage:
            await emit(event([], _usage(self.config.prompt_tokens, n_tokens)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    async def _wait(seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


def _gap(tokens_per_s: float) -> float:
    return 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _call(name: str, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"id": "call_mock0", "type": "function", "function": function}


def main() -> None:
    parser = argparse.ArgumentParser(description="A fast OpenAI-compatible fake upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--reply", default=None, help="Answer this text instead of ` tok`s.")
    parser.add_argument("--echo", type=int, default=0, help="1: answer the last message back.")
    parser.add_argument("--finish", default="length", help="The finish_reason of every answer.")
    parser.add_argument("--tool-call", default=None, help="Answer as a call to this function.")
    args = parser.parse_args()
    import uvicorn

    app = MockUpstream(
        MockConfig(
            model=args.model,
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s,
            output_tokens=args.output_tokens,
            reply=args.reply,
            echo=bool(args.echo),
            finish=args.finish,
            tool_call=args.tool_call,
        )
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
