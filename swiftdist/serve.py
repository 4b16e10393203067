"""`swiftdist serve`: an OpenAI-compatible chat API (FastAPI + uvicorn) for a model and its LoRA adapters.

    swiftdist serve --model smollm2 --adapter output/demo/final [--adapter other=DIR] [--port 8000]

Endpoints: POST /v1/chat/completions (non-streaming, or server-sent events with "stream": true),
GET /v1/models, GET /health. A request's "model" names the base model or one of the adapters; every
adapter sits over the one base in memory. Prompts are rendered with the model's chat template.

Backends: `transformers` generates on the CPU or one GPU, one request at a time (the adapter is
switched on the shared model, so requests queue on a lock); `vllm` (when the package is installed
and a GPU is present) batches requests continuously and serves the adapters as LoRA requests.
`--backend auto` picks vllm where it can run, and the log says which one runs and why.

The server binds 127.0.0.1 unless --host says otherwise. With --api-key (or SWIFTDIST_API_KEY) every
/v1 call must carry `Authorization: Bearer KEY`. Bad requests get OpenAI-style JSON errors (4xx),
never a traceback. SIGTERM or Ctrl-C stop it after in-flight requests finish (--shutdown-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from swiftdist.errors import SwiftdistError

log = logging.getLogger("swiftdist")

API_KEY_ENV = "SWIFTDIST_API_KEY"


# ---- requests ----------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server honours; others are ignored,
    except the few whose meaning it cannot give (n > 1, stop, tools), which are refused."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's defaults and ranges
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    tools: list | None = None


class ApiError(Exception):
    """An error the client caused, sent as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class Job:
    """One generation, as the backend sees it; the backend fills the results in."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    completion_tokens: int = 0
    finish_reason: str = "stop"


# ---- backends ----------------------------------------------------------------------------------


def adapter_names(specs: list[str]) -> dict[str, Path]:
    """`--adapter [NAME=]DIR` values -> {name: dir}. Without NAME, the directory's name; a training
    run's `OUTPUT/final` is named after OUTPUT."""
    adapters = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        path = Path(path if eq else spec).expanduser()
        if not eq:
            name = path.resolve().parent.name if path.name == "final" else path.name
        if not (path / "adapter_config.json").exists():
            raise SwiftdistError(f"--adapter {spec}: no adapter_config.json in {path} (a peft LoRA adapter dir, "
                                 "e.g. OUTPUT_DIR/final of a LoRA run)")
        if name in adapters:
            raise SwiftdistError(f"--adapter {spec}: the name '{name}' is taken; name it with --adapter NAME={path}")
        adapters[name] = path
    return adapters


class TransformersBackend:
    """transformers generate; peft holds every adapter over one base and the request picks one."""

    name = "transformers"

    def __init__(self, model: str, adapters: dict[str, Path], base_name: str, trust_remote_code: bool):
        from swiftdist.infer import load_for_inference

        lm, self.tokenizer = load_for_inference(model, None, trust_remote_code)
        self.base_name = base_name
        for i, (name, path) in enumerate(adapters.items()):
            try:
                if i == 0:  # the first adapter makes the peft model; the others join it
                    from peft import PeftModel

                    lm = PeftModel.from_pretrained(lm, str(path), adapter_name=name)
                else:
                    lm.load_adapter(str(path), adapter_name=name)
            except (ValueError, RuntimeError, KeyError) as e:  # shape mismatches: an adapter of another base
                raise SwiftdistError(f"--adapter {path}: does not fit {model}: {str(e).splitlines()[0]}") from None
        self.lm = lm.eval()
        self.model_names = [base_name, *adapters]
        self.max_model_len = context_length(lm.config, self.tokenizer)
        self.device = str(lm.device)
        # One model, one active adapter: requests take turns.
        self.lock = threading.Lock()

    def _adapter(self, model: str):
        if model != self.base_name:
            self.lm.set_adapter(model)
            return contextlib.nullcontext()
        return self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()

    def _generate(self, job: Job, streamer, cancelled: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):  # the client went away: stop at the next token
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        with self.lock:
            if cancelled.is_set():
                streamer.end()
                return
            ids = torch.tensor([job.prompt_ids], device=self.lm.device)
            sampling = {"do_sample": False}
            if job.temperature > 0:
                sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
                if job.seed is not None:
                    torch.manual_seed(job.seed)  # under the lock, so no other request draws from it
            with self._adapter(job.model), torch.no_grad():
                out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                       max_new_tokens=job.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                       stopping_criteria=StoppingCriteriaList([Cancelled()]), **sampling)
        new = out[0, len(job.prompt_ids):].tolist()
        job.completion_tokens = len(new)
        if cancelled.is_set():
            log.info("%s: the client went away; generation stopped after %d tokens", job.id, len(new))
        ended = bool(new) and new[-1] in _eos_ids(self.lm, self.tokenizer)
        job.finish_reason = "length" if len(new) >= job.max_tokens and not ended else "stop"

    async def stream(self, job: Job) -> AsyncIterator[str]:
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        finished = loop.create_future()  # the generation's exception or None, once job's counts are set

        def run() -> None:
            error = None
            try:
                self._generate(job, streamer, cancelled)
            except Exception as e:
                error = e
                streamer.end()  # the reader must not wait for text that will never come
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server has shut down
                loop.call_soon_threadsafe(finished.set_result, error)

        # A daemon thread: a generation never holds the process up once the server has shut down.
        threading.Thread(target=run, daemon=True).start()
        try:
            async for piece in streamer:
                yield piece
            error = await finished
        finally:
            cancelled.set()
        if error:
            raise error


def context_length(config, tokenizer) -> int:
    """Prompt + completion tokens the model takes: its position embeddings, else the tokenizer's limit."""
    return getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length


def _eos_ids(lm, tokenizer) -> set[int]:
    eos = lm.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return ids | {tokenizer.eos_token_id}


class VllmBackend:
    """vLLM's async engine: continuous batching, adapters as LoRA requests (needs a CUDA GPU)."""

    name = "vllm"

    def __init__(self, model: str, adapters: dict[str, Path], base_name: str, trust_remote_code: bool,
                 max_model_len: int | None):
        from transformers import AutoConfig
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.lora.request import LoRARequest

        from swiftdist.model import load_tokenizer, resolve_model_path

        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 8) for p in adapters.values()]
        # Decided here, not left to vLLM, so that the server's own length checks use the same limit.
        self.max_model_len = max_model_len or context_length(
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), self.tokenizer)
        args = AsyncEngineArgs(model=str(path), trust_remote_code=trust_remote_code, max_model_len=self.max_model_len,
                               enable_lora=bool(adapters), max_loras=max(1, len(adapters)),
                               # vLLM sizes its LoRA buffers by this; it accepts powers of two from 8.
                               max_lora_rank=max(8, 1 << (max(ranks, default=8) - 1).bit_length()))
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.lora = {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(adapters.items())}
        self.model_names = [base_name, *adapters]
        self.device = "cuda"

    async def stream(self, job: Job) -> AsyncIterator[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                seed=job.seed)
        sent = 0
        # Closing this generator (a client that went away) aborts the request inside vLLM.
        async for output in self.engine.generate({"prompt_token_ids": job.prompt_ids}, params, job.id,
                                                 lora_request=self.lora.get(job.model)):
            completion = output.outputs[0]
            yield completion.text[sent:]
            sent = len(completion.text)
            job.completion_tokens = len(completion.token_ids)
            job.finish_reason = completion.finish_reason or "stop"


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why). vLLM needs its package and a CUDA GPU; auto takes it only when both are there."""
    import torch

    missing = [what for what, ok in (("the vllm package", importlib.util.find_spec("vllm") is not None),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if requested == "transformers":
        return "transformers", "asked for"
    if not missing:
        return "vllm", "vllm is installed and a GPU is present"
    if requested == "vllm":
        raise SwiftdistError(f"--backend vllm needs {' and '.join(missing)}, which this machine lacks; "
                             "use --backend transformers (or auto)")
    return "transformers", f"vllm not used: no {' and no '.join(m.removeprefix('a ').removeprefix('the ') for m in missing)}"


# ---- the app -----------------------------------------------------------------------------------


def prepare(backend, request: ChatRequest, default_max_tokens: int) -> Job:
    """Check a request against the served models and the context length; render the prompt."""
    if request.model not in backend.model_names:
        raise ApiError(404, f"The model '{request.model}' does not exist; this server has: "
                            f"{', '.join(backend.model_names)}",
                       "model", "model_not_found")
    for param, unsupported in (("n", request.n != 1), ("stop", bool(request.stop)), ("tools", bool(request.tools))):
        if unsupported:
            raise ApiError(400, f"'{param}' is not supported by this server (n must be 1; no stop sequences or tools)",
                           param, "unsupported_parameter")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        prompt_ids = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    except Exception as e:  # a template that refuses the conversation (e.g. no system role) raises jinja errors
        raise ApiError(400, f"the model's chat template refused these messages: {e}", "messages") from None
    limit = backend.max_model_len
    wanted = request.max_completion_tokens or request.max_tokens
    if len(prompt_ids) + (wanted or 1) > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{len(prompt_ids) + (wanted or 1)} tokens ({len(prompt_ids)} in the messages, "
                            f"{wanted or 1} for the completion).", "messages", "context_length_exceeded")
    max_tokens = wanted or min(default_max_tokens, limit - len(prompt_ids))
    return Job(request.model, prompt_ids, max_tokens, request.temperature, request.top_p, request.seed)


def create_app(backend, api_key: str | None, default_max_tokens: int = 512) -> FastAPI:
    app = FastAPI(title="swiftdist serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response(getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception):
        log.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
        return ApiError(500, "internal server error", kind="server_error").response()

    async def authorized(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "swiftdist"}
                                           for n in backend.model_names]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(request: ChatRequest):
        job = prepare(backend, request, default_max_tokens)
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(_sse(backend, job, usage), media_type="text/event-stream")
        text = "".join([piece async for piece in _answer(backend, job)])
        return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": job.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": job.finish_reason, "logprobs": None}],
                "usage": _usage(job)}

    return app


async def _answer(backend, job: Job) -> AsyncIterator[str]:
    """The backend's text pieces, without the whitespace some templates leave before an answer."""
    started = False
    async for piece in backend.stream(job):
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


def _usage(job: Job) -> dict:
    n = len(job.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": job.completion_tokens, "total_tokens": n + job.completion_tokens}


async def _sse(backend, job: Job, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": job.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in _answer(backend, job):
            yield chunk({"content": piece})
    except Exception as e:  # headers are sent: the stream itself must carry the error
        log.error("generation failed: %s: %s", type(e).__name__, e, exc_info=e)
        yield f"data: {json.dumps(ApiError(500, 'internal server error', kind='server_error').body())}\n\n"
        return
    yield chunk({}, job.finish_reason)
    if include_usage:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": job.model,
                "choices": [], "usage": _usage(job)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ---- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="swiftdist serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="HF model dir or alias (smollm2, tiny-llama)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a LoRA adapter to serve over the model (repeatable); requests name it in 'model'")
    parser.add_argument("--served-model-name", help="the base model's name in requests (default: --model's last part)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; unset: no key)")
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's own)")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="completion length when a request sets none")
    parser.add_argument("--shutdown-timeout", type=int, default=10,
                        help="seconds SIGTERM waits for in-flight requests before cancelling them")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    for name in ("max_model_len", "default_max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SwiftdistError(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_backend(args, adapters: dict[str, Path], base_name: str):
    kind, why = choose_backend(args.backend)
    if kind == "vllm":
        backend = VllmBackend(args.model, adapters, base_name, args.trust_remote_code, args.max_model_len)
    else:
        backend = TransformersBackend(args.model, adapters, base_name, args.trust_remote_code)
        if args.max_model_len:
            backend.max_model_len = args.max_model_len
    log.info("backend: %s on %s (%s)", kind, backend.device, why)
    return backend


def main(argv: list[str]) -> int:
    import uvicorn

    from swiftdist.distributed import setup_logging

    args = parse_args(argv)
    adapters = adapter_names(args.adapter)
    base_name = args.served_model_name or Path(args.model).name
    if base_name in adapters:
        raise SwiftdistError(f"--adapter {base_name}: the name is the base model's; give it another with NAME=DIR")
    setup_logging(0)
    backend = build_backend(args, adapters, base_name)
    app = create_app(backend, args.api_key, args.default_max_tokens)
    log.info("serving %s on http://%s:%d/v1 (max context %d tokens, API key %s)",
             ", ".join([base_name, *adapters]), args.host, args.port, backend.max_model_len,
             "required" if args.api_key else "not required")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found
    # installed; these no-ops make that a normal return (exit 0) instead of a kill or a KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()  # a port that cannot be bound: uvicorn logs why and exits 1
    log.info("stopped")
    return 0
