"""The vLLM backend: OpenAI requests forwarded to a pool of vLLM servers, streams passed through.

- **Client**: one aiohttp session (pooled keep-alive connections). aiohttp was chosen by
  measurement (``benchmarks/http_clients.py``: about 13x httpx's requests/s against the same
  upstream on this machine).
- **Pass-through**: the client's validated body goes upstream with only ``model`` rewritten and,
  for streams, ``stream_options.include_usage`` forced on; SSE events come back byte for byte,
  except that the usage event is dropped when the client did not ask for it and ``model`` is
  renamed when the public name differs from vLLM's.
- **Failover**: connection errors, 5xx and timeouts move the request to another replica, but
  only before anything reached the client; a stream is never replayed. After the first byte, a
  failure ends the stream with an error event.
- **Cancellation**: closing the relay (client gone) closes the upstream connection, and vLLM
  aborts the request.
- **LoRA**: requests for an adapter go to a replica that holds it, or load it there first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.backends.base import (
    Chunk,
    Generation,
    GenerationRequest,
    ModelInfo,
    ProxyCall,
    ProxyResult,
    Usage,
    collect,
)
from gateway.backends.lora import MemoryPlacements, Placements
from gateway.backends.replicas import Replica, ReplicaPool
from gateway.config import AdapterConfig, VllmModelConfig
from gateway.errors import BackendError, Overloaded, RaglineError

log = logging.getLogger("ragline.vllm")

_MAX_EVENT_BYTES = 16 << 20
_USAGE_EVENT = re.compile(rb'"choices": ?\[\]')  # the usage event has no choices
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


class AdapterLoadFailed(BackendError):
    default_code = "adapter_load_failed"


class VllmBackend:
    def __init__(
        self,
        config: VllmModelConfig,
        adapters: list[AdapterConfig] | None = None,
        placements: Placements | None = None,
    ) -> None:
        self.config = config
        self.adapters = {a.name: a for a in adapters or []}
        self.placements = placements or MemoryPlacements()
        self.pool = ReplicaPool(config.upstreams, config.health)
        for replica in self.pool.replicas:
            replica.on_readmit.append(self._forget_adapters)
        self._session: aiohttp.ClientSession | None = None
        self._created = int(time.time())
        self._load_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._session is not None and self.pool.any_healthy

    def unavailable(self) -> Overloaded | None:
        """Why a started backend is not ready: every replica is ejected (None while starting)."""
        if self._session is None:
            return None
        return Overloaded(
            f"No healthy upstream for model '{self.config.name}' right now.",
            retry_after=self.pool.retry_after(),
            code="no_healthy_upstream",
        )

    async def start(self) -> None:
        t = self.config.timeouts
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.config.max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect),
            headers={"Authorization": f"Bearer {self.config.api_key}"}
            if self.config.api_key
            else None,
        )
        self.pool.start(self._health)
        await self.pool.wait_checked()
        healthy = len(self.pool.available())
        log.info(
            "model %s: %d of %d vLLM replicas healthy",
            self.config.name,
            healthy,
            len(self.pool.replicas),
        )

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def models(self) -> list[ModelInfo]:
        base = ModelInfo(
            id=self.config.name,
            owned_by=self.config.owned_by,
            created=self._created,
            max_model_len=self.config.max_model_len,
            root=self.config.upstream_model,
        )
        return [base] + [
            ModelInfo(
                id=a.name,
                owned_by=self.config.owned_by,
                created=self._created,
                max_model_len=self.config.max_model_len,
                root=a.path,
                parent=a.base,
            )
            for a in self.adapters.values()
        ]

    def stats(self) -> dict[str, int]:
        return {
            "replicas": len(self.pool.replicas),
            "healthy": len(self.pool.available()),
            "running": sum(r.outstanding for r in self.pool.replicas),
            "waiting": 0,
        }

    async def _health(self, replica: Replica) -> bool:
        assert self._session is not None
        async with self._session.get(replica.url + "/health") as r:
            return r.status == 200

    # -- adapters ------------------------------------------------------------------------------

    def _forget_adapters(self, replica: Replica) -> None:
        # A re-admitted replica may have restarted and lost its adapters.
        task = asyncio.ensure_future(
            self.placements.forget_replica(replica.url, list(self.adapters))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _ensure_loaded(self, adapter: AdapterConfig, replica: Replica) -> None:
        if replica.url in await self.placements.replicas_with(adapter.name):
            return
        lock = self._load_locks.setdefault((adapter.name, replica.url), asyncio.Lock())
        async with lock:
            if replica.url in await self.placements.replicas_with(adapter.name):
                return
            await self.load_adapter(adapter, replica)

    async def load_adapter(self, adapter: AdapterConfig, replica: Replica) -> None:
        """``POST /v1/load_lora_adapter`` on one replica; raises ``AdapterLoadFailed``."""
        assert self._session is not None
        body = {"lora_name": adapter.name, "lora_path": adapter.path}
        async with self._session.post(replica.url + "/v1/load_lora_adapter", json=body) as r:
            text = await r.text()
        if r.status != 200 and "already" not in text.lower():
            raise AdapterLoadFailed(
                f"Adapter '{adapter.name}' could not be loaded on {replica.url}: "
                f"{_upstream_message(text)}",
                param="model",
            )
        await self.placements.add(adapter.name, replica.url)
        log.info("loaded adapter %s on %s", adapter.name, replica.url)

    async def unload_adapter(self, adapter: AdapterConfig, replica: Replica) -> None:
        assert self._session is not None
        body = {"lora_name": adapter.name}
        async with self._session.post(replica.url + "/v1/unload_lora_adapter", json=body) as r:
            text = await r.text()
        await self.placements.remove(adapter.name, replica.url)
        if r.status != 200 and "not found" not in text.lower() and "not loaded" not in text.lower():
            raise AdapterLoadFailed(
                f"Adapter '{adapter.name}' could not be unloaded from {replica.url}: "
                f"{_upstream_message(text)}",
                param="model",
            )

    # -- forwarding ----------------------------------------------------------------------------

    async def _choose(self, call: ProxyCall, tried: set[Replica]) -> Replica:
        candidates = self.pool.available(tried)
        if not candidates:
            raise Overloaded(
                f"No healthy upstream for model '{self.config.name}' right now.",
                retry_after=self.pool.retry_after(),
                code="no_healthy_upstream",
            )
        if call.adapter is not None:
            holding = await self.placements.replicas_with(call.adapter.name)
            warm = [r for r in candidates if r.url in holding]
            if warm:
                return self.pool.pick(warm)
        return self.pool.pick(candidates)

    async def proxy(self, call: ProxyCall) -> ProxyResult:
        """Forward ``call`` with failover before the first byte; see the module docstring."""
        assert self._session is not None
        upstream_model = call.adapter.name if call.adapter else self.config.upstream_model
        body = {**call.body, "model": upstream_model}
        if call.stream:
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if call.request_id:
            headers["X-Request-Id"] = call.request_id
        rename = (upstream_model.encode(), call.public_model.encode())
        tried: set[Replica] = set()
        reloaded = False
        last_error = "no replica was tried"
        t = self.config.timeouts
        while True:
            replica = await self._choose(call, tried)
            tried.add(replica)
            replica.outstanding += 1
            handed_over = False
            try:
                if call.adapter is not None:
                    await self._ensure_loaded(call.adapter, replica)
                deadline = asyncio.get_running_loop().time() + t.total
                async with asyncio.timeout(t.first_token):
                    response = await self._session.post(
                        replica.url + call.endpoint, data=data, headers=headers
                    )
                if response.status >= 500:
                    last_error = f"{replica.url} answered {response.status}"
                    response.close()
                    self.pool.failed(replica, connection=False, reason=last_error)
                    continue
                if response.status == 404 and call.adapter is not None and not reloaded:
                    # Placement was stale (the replica restarted): load again and retry there.
                    response.close()
                    await self.placements.remove(call.adapter.name, replica.url)
                    tried.discard(replica)
                    reloaded = True
                    continue
                if response.status >= 400 or not call.stream:
                    async with asyncio.timeout(_left(deadline)):
                        payload = await response.read()
                    self.pool.succeeded(replica)
                    if response.status < 400 and rename[0] != rename[1]:
                        payload = _rename(payload, rename)
                    return ProxyResult(response.status, payload, replica=replica.url)
                async with asyncio.timeout(t.first_token):
                    first = await _next_event(response)
                if first is None:
                    raise aiohttp.ClientPayloadError("upstream closed the stream before any event")
                self.pool.succeeded(replica)
                handed_over = True
                return ProxyResult(
                    200,
                    events=self._relay(response, replica, first, call, rename, deadline),
                    replica=replica.url,
                )
            except AdapterLoadFailed:
                raise
            except _CONNECTION_ERRORS as exc:
                last_error = f"{replica.url}: {type(exc).__name__}: {exc}"
                self.pool.failed(replica, connection=True, reason=last_error)
            except TimeoutError:
                last_error = f"{replica.url} timed out"
                self.pool.failed(replica, connection=False, reason=last_error)
            finally:
                if not handed_over:
                    replica.outstanding -= 1
            if not self.pool.available(tried):
                raise Overloaded(
                    f"No upstream for model '{self.config.name}' could answer ({last_error}).",
                    retry_after=self.pool.retry_after(),
                    code="no_healthy_upstream",
                )

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        replica: Replica,
        first: bytes,
        call: ProxyCall,
        rename: tuple[bytes, bytes],
        deadline: float,
    ) -> AsyncIterator[bytes]:
        """Yield the upstream's SSE events as they come; always release the replica."""
        finished = False
        try:
            event: bytes | None = first
            while event is not None:
                if event.startswith(b"data: [DONE]"):
                    finished = True
                    yield event
                    return
                if _USAGE_EVENT.search(event):
                    call.usage = _usage_of(event)
                    if call.include_usage:
                        yield _rename(event, rename) if rename[0] != rename[1] else event
                elif rename[0] != rename[1]:
                    yield _rename(event, rename)
                else:
                    yield event
                async with asyncio.timeout(_left(deadline)):
                    event = await _next_event(response)
            raise BackendError("The upstream closed the stream before it finished.")
        except _CONNECTION_ERRORS as exc:
            self.pool.failed(replica, connection=True, reason=f"stream broke: {exc}")
            raise BackendError(
                "The upstream connection broke in the middle of the response.",
                code="upstream_disconnected",
            ) from exc
        except TimeoutError as exc:
            raise BackendError(
                "The upstream did not finish in time.", code="upstream_timeout"
            ) from exc
        finally:
            replica.outstanding -= 1
            if not finished:
                response.close()  # closes the connection: vLLM aborts the request
            else:
                response.release()

    # -- the Backend protocol (used by tools that speak GenerationRequest, e.g. evaluations) ---

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk | Usage]:
        call = _call_from_generation(request, self.config.name, stream=True)
        result = await self.proxy(call)
        if result.events is None:
            raise _upstream_error(result)
        async for event in result.events:
            if event.startswith(b"data: [DONE]"):
                return
            payload = json.loads(event[len(b"data: ") :])
            if "error" in payload:
                raise BackendError(str(payload["error"].get("message", "upstream error")))
            if payload.get("usage") and not payload.get("choices"):
                u = payload["usage"]
                yield Usage(u["prompt_tokens"], u["completion_tokens"])
                continue
            for choice in payload.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if text or choice.get("finish_reason"):
                    yield Chunk(choice["index"], text, choice.get("finish_reason"))

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request), request.n)


def _call_from_generation(request: GenerationRequest, model: str, stream: bool) -> ProxyCall:
    p = request.params
    body: dict[str, Any] = {
        "n": request.n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "stream": stream,
    }
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.ignore_eos:
        body["ignore_eos"] = True
    if request.messages is not None:
        body["messages"] = list(request.messages)
        endpoint = "/v1/chat/completions"
    else:
        body["prompt"] = list(request.prompt_ids) if request.prompt_ids else request.prompt
        endpoint = "/v1/completions"
    return ProxyCall(
        endpoint,
        body,
        stream,
        include_usage=True,
        public_model=model,
        request_id=request.request_id,
    )


def _upstream_error(result: ProxyResult) -> RaglineError:
    error = RaglineError(_upstream_message(result.body.decode(errors="replace")))
    error.status_code = result.status
    error.error_type = "invalid_request_error" if result.status < 500 else "server_error"
    return error


async def _next_event(response: aiohttp.ClientResponse) -> bytes | None:
    """The next ``data: ...`` event including its blank line, or None at the end of the body."""
    while True:
        event = await response.content.readuntil(b"\n\n", max_size=_MAX_EVENT_BYTES)
        if not event.endswith(b"\n\n"):  # end of the body
            if event.strip():
                raise aiohttp.ClientPayloadError(
                    "the upstream stream ended in the middle of an event"
                )
            return None
        if event.startswith(b"data:"):
            return event
        # blank keep-alives, comments and other SSE fields are not part of OpenAI's stream


def _usage_of(event: bytes) -> tuple[int, int] | None:
    try:
        usage = json.loads(event[len(b"data: ") :])["usage"]
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return None


def _rename(payload: bytes, rename: tuple[bytes, bytes]) -> bytes:
    old, new = rename
    return payload.replace(b'"model":"' + old + b'"', b'"model":"' + new + b'"', 1)


def _left(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


def _upstream_message(text: str) -> str:
    try:
        payload = json.loads(text)
        if isinstance(payload, dict):
            error = payload.get("error", payload)
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
    except ValueError:
        pass
    return text.strip()[:500] or "no details"
