"""The embedded engine: a transformers checkpoint served in-process with continuous batching.

It needs no GPU and no server: ``start()`` starts the engine thread, which loads the weights (CUDA
when present, else CPU) and then runs the scheduler (``scheduler.py``). One thread does both on
purpose: PyTorch's OpenMP thread pool belongs to the thread that runs a parallel op, and a
second pool kept alive by another thread (a loader thread of the asyncio executor) made libgomp
count more threads than cores and stop spinning between ops: a decode step took 35-45 ms
instead of 19-23 ms on the 2-core machine (the step alone, bf16, one stream). Prompts are rendered
with the tokenizer's own chat template and counted with its tokenizer, so ``usage`` is exact.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gateway.backends.base import (
    Capabilities,
    Chunk,
    Event,
    Generation,
    GenerationRequest,
    ModelInfo,
    collect,
    merge,
)
from gateway.backends.engine_jobs import Job
from gateway.backends.grammar import Grammar, Grammars
from gateway.backends.llama import LlamaRunner
from gateway.backends.quant import Int4Kernel, Quant, on_cpu_with_bf16
from gateway.backends.scheduler import Scheduler
from gateway.backends.tool_calls import TOOLS_TEMPLATE, ToolParsers, uses_tools
from gateway.config import AdapterConfig, EmbeddedModelConfig
from gateway.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from gateway.model_config import Quantization

log = logging.getLogger("ragline.embedded")

_LONG_PROMPT_CHARS = 20_000  # tokenize longer prompts off the event loop
DEFAULT_KV_SEQUENCES = 16  # without kv_cache_gib: room for this many full-length sequences


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_quantization(
    quantization: Quantization, device: torch.device, dtype: str = "auto"
) -> Quant:
    """The weights' quantization, ``none``, ``int8`` or ``int4``: as asked for, or for ``auto``
    int4 on a CPU when no dtype was asked for either. On the 2-core AVX-512-BF16 machine int4
    decodes one stream 1.34-1.37x as fast as int8 and over twice as fast as bf16 (71-73 vs 53 vs 31
    tok/s in one ``make bench`` run; 214 vs 168 vs 185 at eight streams), on the AVX2-only one
    1.16-1.33x int8 (35-41 vs 31 tok/s; bf16 32, float32 18; 1.08-1.17x in a later A/B run,
    1.06-1.12x at eight streams); the capitals eval:
    88 of 100 against 89 for int8 and 90 for bf16. A dtype set in the config (float32 for exact
    parity, say) keeps unquantized weights."""
    if quantization == "int8" or quantization == "int4":
        return quantization
    if quantization == "auto" and device.type == "cpu" and dtype == "auto":
        return "int4"
    return "none"


def choose_int4_kernel(name: str, quant: Quant) -> Int4Kernel:
    """Whose kernel multiplies int4 weights: as asked for, or for ``auto`` ONNX Runtime's, whose
    decode step is one graph (``ort_decode.DecodeGraph``). Measured with ``python -m
    benchmarks.engine`` against PyTorch's kernel in the same runs on the 2-core AMX machine
    (stop 45, five runs): one stream 67-92 tok/s against 37-59 (0.80-1.02x llama.cpp against
    0.44-0.58x), eight streams 222-274 against 112-192, cold TTFT for 40 tokens 47-58 ms against
    47-88 (its int8 copy against the dense bf16 one); on the AVX2-only machine, where PyTorch's
    kernel unpacks to float, 45-58 tok/s against 26-31 before the graph. The AVX-512-BF16 kind
    without AMX was last compared before the graph (stop 40: a tie for decoding, a slower cold
    prefill). ``int4_kernel: torch`` keeps PyTorch's kernel: about 0.6 GB less memory and, where
    bf16 is native, faster prefills of 128 tokens and more (README, the stop 45 table)."""
    if quant != "int4":
        return "torch"
    if name == "auto":
        return "onnxruntime"
    return "onnxruntime" if name == "onnxruntime" else "torch"


def choose_dtype(
    name: str, device: torch.device, quantized: bool = False, kernel: Int4Kernel = "torch"
) -> torch.dtype:
    if name != "auto":
        dtype: torch.dtype = getattr(torch, name)
        return dtype
    if kernel == "onnxruntime":  # MatMulNBits takes float32 activations
        return torch.float32
    if device.type == "cuda" or on_cpu_with_bf16() or quantized:  # their fast kernels take bf16
        return torch.bfloat16
    return torch.float32


def choose_dense_prefill(
    enabled: bool, quant: Quant, kernel: Int4Kernel = "torch"
) -> torch.dtype | None:
    """The dtype of the copy long prompts are prefilled with (``LlamaRunner``), or None:
    bf16 on CPUs with native bf16, float32 on the others (their bf16 matmuls are emulated:
    100 prompt tokens in 1,150 ms against 258 in float32 on the AVX2-only machine). With ONNX
    Runtime's int4 kernel, ``torch.int8``: the copy is int8 on the runtime's integer GEMM
    (``QGemmWeight``, float32 activations): a dense PyTorch copy, even bf16 where it is native, has
    PyTorch's threads contend with the runtime's spinning pool (``make bench`` on the
    AVX-512-BF16 machine, stop 40: warm TTFT 114 ms against 26 without the copy)."""
    if not enabled or quant == "none":
        return None
    if kernel == "onnxruntime":
        return torch.int8
    return torch.bfloat16 if on_cpu_with_bf16() else torch.float32


def _settle(
    loaded: asyncio.Future[Scheduler], scheduler: Scheduler | None, error: Exception | None
) -> None:
    """On the event loop: hand the engine thread's result to ``start``; a scheduler nobody
    waits for any more (``start`` was cancelled) is told to stop."""
    if loaded.cancelled():
        if scheduler is not None:
            scheduler.request_stop()
    elif scheduler is None:
        loaded.set_exception(error or RuntimeError("the engine thread loaded nothing"))
    else:
        loaded.set_result(scheduler)


class EmbeddedBackend:
    # what the chat template and the scheduler do not do
    capabilities = Capabilities(
        message_names=False,
        best_of=False,
        suffix=False,
        stream_batches=False,
        echo_token_ids=False,
        forwards_body=False,
    )

    def __init__(
        self,
        config: EmbeddedModelConfig,
        model_path: Path,
        adapters: list[AdapterConfig] | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.model_path = model_path
        self.adapters = {a.name: a for a in adapters or []}
        self._created = int(time.time())
        self._tokenizer: Any = None
        self._scheduler: Scheduler | None = None
        self.device_type = "unknown"  # cpu or cuda, once loaded
        self.weights = "unknown"  # int8, int4 or the dtype, once loaded
        self._max_len = config.max_model_len
        self._vocab_size = 0
        self._grammars: Grammars | None = None
        self._tool_template: str | None = None
        self.load_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    def unavailable(self) -> Overloaded:
        if self.load_error is not None:
            return Overloaded(f"The model '{self.name}' failed to load: {self.load_error}")
        return Overloaded(f"The model '{self.name}' is not ready yet.", retry_after=5)

    def models(self) -> list[ModelInfo]:
        base = ModelInfo(
            id=self.config.name,
            owned_by=self.config.owned_by,
            created=self._created,
            max_model_len=self._max_len,
            root=str(self.model_path),
        )
        return [base] + [
            ModelInfo(
                id=a.name,
                owned_by=self.config.owned_by,
                created=self._created,
                max_model_len=self._max_len,
                root=a.path,
                parent=a.base,
            )
            for a in self.adapters.values()
        ]

    def chat_tokenizer(self) -> tuple[Any, int]:
        """The request-side tokenizer and the context length (prompt templates count with it)."""
        return self._tokenizer, self._max_len

    def stats(self) -> dict[str, int | str]:
        """Load and KV cache figures for ``/ready`` and ``/metrics`` (the ``kv_*`` and
        ``prefix_*`` counts grow from start)."""
        out: dict[str, int | str] = {
            "running": 0,
            "waiting": 0,
            "slots": self.config.max_batch,
            "device": self.device_type,
        }
        scheduler = self._scheduler
        if scheduler is not None:
            out["running"], out["waiting"] = scheduler.load
            pool = scheduler.pool
            out |= {
                "kv_blocks": pool.num_blocks - 1,
                "kv_blocks_used": pool.in_use,
                "kv_blocks_cached": pool.cached,
                "kv_block_size": pool.block_size,
                "prefix_queried_tokens": pool.stats.queried_tokens,
                "prefix_hit_tokens": pool.stats.hit_tokens,
                "preemptions": pool.stats.preemptions,
            }
        return out

    async def start(self) -> None:
        """Start the engine thread; return once it has loaded tokenizer and weights (seconds)."""
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[Scheduler] = loop.create_future()
        thread = threading.Thread(
            target=self._engine_thread, args=(loop, loaded), name="ragline-engine", daemon=True
        )
        thread.start()
        try:
            self._scheduler = await loaded
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            # the thread returns right after handing over the error: when start raises, it is
            # gone (it could otherwise still be alive for a moment)
            await asyncio.to_thread(thread.join)
            raise

    def _engine_thread(
        self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[Scheduler]
    ) -> None:
        """Load, hand the scheduler to ``start``, then run it here until ``aclose``."""
        try:
            scheduler = self._load(loop)
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, loaded, None, exc)
            return
        loop.call_soon_threadsafe(_settle, loaded, scheduler, None)
        scheduler.run()

    def _load(self, loop: asyncio.AbstractEventLoop) -> Scheduler:
        from transformers import AutoTokenizer, GenerationConfig

        if not (self.model_path / "config.json").exists():
            raise FileNotFoundError(
                f"no model at {self.model_path}; run `ragline models pull` (or `make setup`)"
            )
        device = choose_device(self.config.device)
        self.device_type = device.type  # /ready reports it: benchmarks choose goals by it
        quant = choose_quantization(self.config.quantization, device, self.config.dtype)
        kernel = choose_int4_kernel(self.config.int4_kernel, quant)
        dtype = choose_dtype(self.config.dtype, device, quant != "none", kernel)
        self.weights = quant if quant != "none" else str(dtype).removeprefix("torch.")
        if kernel != "torch":
            self.weights = f"int4-{kernel}"
            # this thread's PyTorch work (sampling, the norms between the runtime's calls) on one
            # thread, so that no OpenMP thread spins beside ONNX Runtime's pool: 31.6 tok/s for
            # one stream with two (the runner's own switch covers only its layers), 57.8 with one.
            # OpenMP's thread count is per thread: threads already running keep theirs (threads
            # started later default to this one: the benchmark's baseline sets its own).
            torch.set_num_threads(1)
        started = time.perf_counter()
        # Two tokenizers: the request side and the engine thread never share one (the second
        # a copy: a third of the time of loading it again)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        engine_tokenizer = copy.deepcopy(self._tokenizer)
        gib = self.config.kv_cache_gib
        runner = LlamaRunner.from_pretrained(
            self.model_path,
            max_slots=self.config.max_batch,
            max_len=self.config.max_model_len,
            dtype=dtype,
            device=device,
            block_size=self.config.kv_block_size,
            kv_cache_bytes=int(gib * 2**30) if gib is not None else None,
            default_sequences=DEFAULT_KV_SEQUENCES,
            quant=quant,
            dense_prefill=choose_dense_prefill(self.config.dense_prefill, quant, kernel),
            int4_kernel=kernel,
        )
        if device.type == "cuda" and self.config.cuda_graphs:
            try:
                sizes = runner.capture_cuda_graphs()
                log.info("captured CUDA graphs of the decode step for batch sizes %s", sizes)
            except Exception as exc:  # a driver or torch that cannot capture: run eagerly
                log.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
        if self.adapters:
            from finetune.adapters import inspect

            for adapter in self.adapters.values():  # a clear error for a mismatched adapter
                inspect(Path(adapter.path).expanduser(), self.model_path, check_checksum=False)
            runner.load_adapters(
                {a.name: Path(a.path).expanduser() for a in self.adapters.values()}
            )
        self._max_len = runner.max_len
        self._vocab_size = runner.shape.vocab_size
        eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids |= {self._tokenizer.eos_token_id}
        self._grammars = Grammars(self._tokenizer, runner.shape.vocab_size, eos_ids)
        if self.config.tool_template is not None:
            self._tool_template = self.config.tool_template.expanduser().read_text()
        elif uses_tools(getattr(self._tokenizer, "chat_template", None)):
            self._tool_template = None  # the model's own template renders tools
        else:
            self._tool_template = TOOLS_TEMPLATE
        scheduler = Scheduler(
            runner,
            engine_tokenizer,
            eos_ids=eos_ids,
            max_batch=self.config.max_batch,
            max_waiting=self.config.max_waiting,
            loop=loop,
            prefix_caching=self.config.prefix_caching,
        )
        log.info(
            "model %s loaded from %s on %s (%s) in %.1fs",
            self.config.name,
            self.model_path,
            device,
            self.weights,
            time.perf_counter() - started,
        )
        return scheduler

    async def aclose(self) -> None:
        if self._scheduler is not None:
            scheduler, self._scheduler = self._scheduler, None
            await asyncio.to_thread(scheduler.stop)

    # -- requests ------------------------------------------------------------------------------

    async def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Render and tokenize the request's prompt exactly as the model will see it."""
        if request.prompt_ids is not None:
            bad = [t for t in request.prompt_ids if not 0 <= t < self._vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", param="prompt")
            return list(request.prompt_ids)
        size = sum(len(m["content"]) for m in request.messages or ()) + len(request.prompt or "")
        if size > _LONG_PROMPT_CHARS:
            return await asyncio.to_thread(self._encode, request)
        return self._encode(request)

    def _encode(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.messages is not None:
            messages = list(request.messages)
            tooled = request.tools or any(
                m.get("tool_calls") or m["role"] == "tool" for m in messages
            )
            text = tok.apply_chat_template(
                messages,
                tools=list(request.tools) or None,
                chat_template=self._tool_template if tooled else None,
                tokenize=False,
                add_generation_prompt=True,
            )
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(request.prompt or ""))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        scheduler = self._scheduler
        if scheduler is None:
            raise self.unavailable()
        if request.batch:
            raise InvalidRequest("streaming supports one prompt per request.", param="prompt")
        prompt_ids = await self.prompt_ids(request)
        grammar = await self._grammar(request.params.response_format, request.params.tools)
        job = Job(
            prompt_ids=prompt_ids,
            params=request.params,
            n=request.n,
            max_tokens=self._max_tokens(request, len(prompt_ids)),
            queue=asyncio.Queue(),
            adapter=self._adapter_index(request.adapter),
            grammar=grammar,
            tenant=(request.tenant or "") if self.config.prefix_cache_scope == "key" else "",
        )
        self._check_logit_bias(request)
        scheduler.submit(job)
        done = False
        try:
            if request.echo:  # the prompt leads each choice's text
                for i in range(request.n):
                    yield Chunk(i, request.prompt or "")
            parsers = ToolParsers(request.n) if request.params.tools else None
            while True:
                event = await job.queue.get()
                if isinstance(event, Exception):
                    raise event
                if parsers is not None and isinstance(event, Chunk):
                    for out in parsers.feed(event):
                        yield out
                else:
                    yield event
                if not isinstance(event, Chunk):
                    done = True
                    return
        finally:
            if not done:
                scheduler.cancel(job)

    async def generate(self, request: GenerationRequest) -> Generation:
        if not request.batch:
            return await collect(self.stream(request), request.n)
        singles = [
            replace(
                request,
                batch=(),
                prompt=p if isinstance(p, str) else None,
                prompt_ids=None if isinstance(p, str) else p,
            )
            for p in request.batch
        ]
        generations = await asyncio.gather(*(collect(self.stream(r), r.n) for r in singles))
        return merge(list(generations))

    async def _grammar(self, response_format: str | None, tools: str | None) -> Grammar | None:
        """The compiled grammar of a structured-output or tool-calling request (built off the
        event loop the first time a format is seen, then cached). Raises ``InvalidRequest``."""
        if response_format is None and tools is None:
            return None
        assert self._grammars is not None
        grammar = self._grammars.cached(f"{response_format}\n{tools}")
        if grammar is None:
            grammar = await asyncio.to_thread(self._grammars.compile, response_format, tools)
        return grammar

    def _adapter_index(self, name: str | None) -> int:
        if name is None:
            return 0
        assert self._scheduler is not None
        index = self._scheduler.adapter_index(name)
        if index is None:
            raise InvalidRequest(f"adapter {name!r} is not loaded on this model", param="model")
        return index

    def _max_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        room = self._max_len - prompt_len
        wanted = request.params.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._max_len} tokens. However, you "
                f"requested {prompt_len + (wanted or 1)} tokens ({prompt_len} in the messages, "
                f"{wanted or 1} in the completion). Please reduce the length of the messages or "
                "completion.",
                param="messages" if request.messages is not None else "prompt",
            )
        return wanted if wanted is not None else room

    def _check_logit_bias(self, request: GenerationRequest) -> None:
        for token_id, _ in request.params.logit_bias:
            if not 0 <= token_id < self._vocab_size:
                raise InvalidRequest(
                    f"logit_bias token id {token_id} is outside the vocabulary "
                    f"(0..{self._vocab_size - 1})",
                    param="logit_bias",
                )
