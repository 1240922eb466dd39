"""The OpenAI-compatible HTTP API (FastAPI) over the batching engine, plus the playground.

Decoders answer /v1/chat/completions (rendered with the model's chat template) and
/v1/completions; encoders answer /v1/embeddings. Every error is OpenAI's shape
{"error": {"message", "type", "param", "code"}} with a 4xx status when the request is at fault."""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AllformersError
from .engine import Engine, Event, QueueFullError, SamplingParams, Seq
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest, parse

log = logging.getLogger("allformers.serve")
PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class Served:
    """One model behind the API: a decoder with its engine, or an encoder for embeddings."""
    name: str
    model: object
    tokenizer: object
    engine: Optional[Engine] = None  # None: an embedding model
    # a server-side dialogue mode (dialogue/modes.py): messages -> reply, run under `lock` instead of
    # the engine for chat completions (completions still go to the engine)
    dialogue: Optional[object] = None
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # embeddings run one batch at a time

    @property
    def kind(self) -> str:
        return "chat" if self.engine is not None else "embedding"


def create_app(served: list, api_key: Optional[str] = None) -> FastAPI:
    """served: Served models (names unique). api_key: when set, /v1/* and /metrics need
    `Authorization: Bearer <api_key>`."""
    models = {s.name: s for s in served}
    metrics = Metrics(models)

    async def lifespan(app):
        for s in served:
            if s.engine is not None:
                s.engine.start()
        yield
        for s in served:
            if s.engine is not None:
                s.engine.stop()

    app = FastAPI(title="allformers", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_StatusCounter, metrics=metrics)
    app.state.models, app.state.metrics = models, metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        if e.status_code == 404:
            err = APIError(404, f"Invalid URL ({request.method} {request.url.path}): see /v1/models, "
                                f"/v1/chat/completions, /v1/completions, /v1/embeddings", code="unknown_url")
        elif e.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed for {request.url.path}", code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _bug(request, e):  # never a bare 500: still OpenAI's shape, and logged with its traceback
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    def auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer <key>' "
                                "(the key the server was started with: --api-key)",
                           type="authentication_error", code="invalid_api_key")

    def lookup(name: str, kind: str) -> Served:
        if name not in models:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(models)}",
                           param="model", code="model_not_found")
        s = models[name]
        if s.kind != kind:
            what = {"chat": "generates text (use /v1/chat/completions or /v1/completions)",
                    "embedding": "is an embedding model (use /v1/embeddings)"}[s.kind]
            raise APIError(400, f"The model '{name}' {what}", param="model", code="wrong_model_kind")
        return s

    # ------------------------------------------------------------------ pages and metadata
    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [{"id": s.name, "kind": s.kind,
                                            **({"running": s.engine.n_running, "waiting": s.engine.n_waiting,
                                                "slots": s.engine.slots} if s.engine else {})}
                                           for s in models.values()]}

    @app.get("/metrics")
    async def metrics_page(request: Request):
        auth(request)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        auth(request)
        return {"object": "list", "data": [_model_card(s) for s in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        auth(request)
        if name not in models:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(models[name])

    # ------------------------------------------------------------------ generation
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        req = parse(ChatRequest, await request.body())
        s = lookup(req.model, "chat")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        tok = s.tokenizer
        if not tok.chat_template:
            raise APIError(400, f"The model '{s.name}' has no chat template; use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if s.dialogue is not None:
            return await _dialogue_reply(s, messages, req)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except AllformersError as e:
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        prompt = tok.backend.encode(text, add_special_tokens=False).ids
        max_tokens = req.max_completion_tokens or req.max_tokens
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        run = Run(s, [prompt], req, max_tokens=max_tokens, default_max=None, logprobs=n_top, what="messages",
                  metrics=metrics)
        if req.stream:
            return _sse(run.chat_stream(request))
        await run.wait(request)
        return run.chat_body()

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        req = parse(CompletionRequest, await request.body())
        s = lookup(req.model, "chat")
        if req.suffix is not None:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n here (no server-side reranking)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        prompts = _prompts(req.prompt, s.tokenizer)
        run = Run(s, prompts, req, max_tokens=req.max_tokens, default_max=16, logprobs=req.logprobs, what="prompt",
                  metrics=metrics, echo=req.echo)
        if req.stream:
            return _sse(run.completion_stream(request))
        await run.wait(request)
        return run.completion_body()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        auth(request)
        req = parse(EmbeddingRequest, await request.body())
        s = lookup(req.model, "embedding")
        batch = _embedding_batch(req.input, s)
        dim = s.model.config.n_embd
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"The model '{s.name}' gives {dim}-dimensional embeddings; dimensions={req.dimensions} "
                                f"cannot be served", param="dimensions")
        vectors = await asyncio.to_thread(_embed, s, batch)
        data = []
        for i, v in enumerate(vectors.tolist()):
            if req.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
                v = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": v})
        n_tokens = int(batch["attention_mask"].sum())
        metrics.prompt_tokens.labels(s.name).inc(n_tokens)
        return {"object": "list", "data": data, "model": s.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


def _model_card(s: Served) -> dict:
    card = {"id": s.name, "object": "model", "created": s.created, "owned_by": "allformers", "kind": s.kind}
    if s.engine is not None:
        card["max_model_len"] = s.engine.max_len
    return card


async def _dialogue_reply(s: Served, messages: list, req):
    """A chat completion from the model's dialogue mode: one choice, streamed as one chunk."""
    if req.n not in (None, 1):
        raise APIError(400, f"the model '{s.name}' answers through a dialogue mode, which gives one choice (n=1)",
                       param="n")
    if req.logprobs:
        raise APIError(400, f"the model '{s.name}' answers through a dialogue mode, which has no logprobs",
                       param="logprobs")

    def answer():
        with s.lock:
            return s.dialogue(messages)

    try:
        reply = await asyncio.to_thread(answer)
    except AllformersError as e:  # e.g. a conversation too long for the model's context
        raise APIError(400, str(e), param="messages") from None
    tok = s.tokenizer
    prompt_tokens = len(tok.backend.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                                           add_special_tokens=False).ids)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tok.encode(reply, add_bos=False)),
             "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": s.name}
    if not req.stream:
        return {**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None, "finish_reason": "stop"}]}
    with_usage = req.stream_options is not None and req.stream_options.include_usage

    async def events():
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if with_usage else {}
        for choice in ({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None},
                       {"index": 0, "delta": {"content": reply}, "logprobs": None, "finish_reason": None},
                       {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}):
            yield f"data: {_json({**chunk, 'choices': [choice], **extra})}\n\n"
        if with_usage:
            yield f"data: {_json({**chunk, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return _sse(events())


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _prompts(prompt, tokenizer) -> list:
    """The four shapes OpenAI allows -> a list of token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id]  # an empty prompt starts from the beginning-of-text token
        if not ids:
            raise APIError(400, "the prompt is empty and this tokenizer has no beginning-of-text token to start from",
                           param="prompt")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (0 .. {tokenizer.vocab_size - 1})",
                           param="prompt")
        out.append(ids)
    return out


def _embedding_batch(inputs, s: Served) -> dict:
    tok, limit = s.tokenizer, s.model.config.block_size
    if isinstance(inputs, str) or (isinstance(inputs, list) and isinstance(inputs[0], str)):
        texts = [inputs] if isinstance(inputs, str) else inputs
        if any(not t for t in texts):
            raise APIError(400, "input strings must not be empty", param="input")
        batch = tok.batch(texts)
    else:
        rows = [inputs] if isinstance(inputs[0], int) else inputs
        bad = [t for r in rows for t in r if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (0 .. {tok.vocab_size - 1})", param="input")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    longest = int(batch["attention_mask"].sum(1).max())
    if longest > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, but an input has {longest} tokens; "
                            f"shorten it", param="input", code="context_length_exceeded")
    if len(batch["input_ids"]) > 2048:
        raise APIError(400, f"at most 2048 inputs per request, got {len(batch['input_ids'])}", param="input")
    return batch


@torch.inference_mode()
def _embed(s: Served, batch: dict) -> torch.Tensor:
    dev = next(s.model.parameters()).device
    with s.lock:
        out = []
        for i in range(0, len(batch["input_ids"]), 32):
            part = {k: v[i:i + 32].to(dev) for k, v in batch.items()}
            out.append(s.model(part["input_ids"], attention_mask=part["attention_mask"],
                               token_type_ids=part["token_type_ids"]).float().cpu())
    return torch.cat(out)


class Run:
    """One API request's sequences (n choices per prompt) in the engine, and its responses."""

    def __init__(self, s: Served, prompts: list, req, *, max_tokens, default_max, logprobs, what, metrics, echo=False):
        self.s, self.req, self.metrics, self.echo = s, req, metrics, echo
        self.t0 = time.perf_counter()
        self.id = f"{'chatcmpl' if what == 'messages' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompts = prompts
        limit = s.engine.max_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                f"resulted in {longest} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - longest if default_max is None else min(default_max, limit - longest)
        if longest + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {what} or the completion.",
                           param=what, code="context_length_exceeded")
        tok = s.tokenizer
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        if any(k >= tok.vocab_size for k in bias):
            raise APIError(400, f"logit_bias names token {max(bias)}, past the vocabulary ({tok.vocab_size} tokens)",
                           param="logit_bias")
        stop_ids = [t for t in (tok.eos_id,) if t is not None]
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = []
        for p in prompts:
            for j in range(req.n):
                params = SamplingParams(
                    max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                    presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                    logit_bias=bias or None, seed=None if req.seed is None else req.seed + j, stop=req.stop_list(),
                    logprobs=logprobs, stop_token_ids=stop_ids)
                index = len(self.seqs)
                self.seqs.append(Seq(p, params, tok, self._deliver(index)))
        self.texts = [""] * len(self.seqs)
        self.logprobs = [[] for _ in self.seqs]
        self.finish = [None] * len(self.seqs)
        self.errors = []
        self.t_last = [None] * len(self.seqs)
        try:
            s.engine.submit(self.seqs)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except AllformersError as e:
            raise APIError(400, str(e), param=what, code="context_length_exceeded") from None
        metrics.prompt_tokens.labels(s.name).inc(sum(len(p) for p in prompts))

    def _deliver(self, index):
        def deliver(event: Event):  # the engine thread -> this request's event loop
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return deliver

    def cancel(self):
        self.s.engine.cancel([q for q in self.seqs if q.finish_reason is None])

    async def events(self, request: Optional[Request] = None):
        """(choice index, Event) until every choice has finished. With `request` (non-streaming
        responses), a client that hangs up cancels the sequences; streaming responses learn it
        from Starlette, which cancels this generator."""
        left, checked = len(self.seqs), time.perf_counter()
        try:
            while left:
                if request is not None and time.perf_counter() - checked > 0.25:  # every 1/4 s, events or not
                    if await request.is_disconnected():
                        return
                    checked = time.perf_counter()
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.25 if request is not None else None)
                except asyncio.TimeoutError:
                    continue
                self._record(i, ev)
                if ev.finish_reason is not None:
                    left -= 1
                yield i, ev
        finally:
            if left:
                self.cancel()

    def _record(self, i, ev: Event):
        now = time.perf_counter()
        name = self.s.name
        if ev.text or ev.finish_reason is None:
            if self.t_last[i] is None:
                self.metrics.ttft.labels(name).observe(now - self.t0)
            else:
                self.metrics.itl.labels(name).observe(now - self.t_last[i])
            self.t_last[i] = now
        self.texts[i] += ev.text
        self.logprobs[i].extend(ev.logprobs)
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason
            self.metrics.generation_tokens.labels(name).inc(ev.n_tokens)
            self.metrics.finished.labels(name, ev.finish_reason).inc()
            if ev.error:
                self.errors.append(ev.error)

    async def wait(self, request: Request):
        async for _ in self.events(request):
            pass
        if self.errors:
            raise APIError(500, f"generation failed: {self.errors[0]}", type="server_error")

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(q.generated) for q in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _finish_reason(self, i):
        return {"cancelled": "stop", "error": "stop"}.get(self.finish[i], self.finish[i])

    # ------------------------------------------------------------------ chat shapes
    def chat_body(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                    "logprobs": {"content": [_chat_lp(t) for t in self.logprobs[i]]}
                    if self.seqs[i].params.logprobs is not None else None,
                    "finish_reason": self._finish_reason(i)} for i in range(len(self.seqs))]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.s.name,
                "choices": choices, "usage": self.usage()}

    def _wants_usage(self) -> bool:
        return self.req.stream_options is not None and self.req.stream_options.include_usage

    def _chunk(self, obj: str, choices: list, usage=False) -> str:
        """One SSE event. With include_usage every chunk has "usage": null, and the last one (no
        choices) the request's usage."""
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.s.name, "choices": choices}
        if self._wants_usage():
            body["usage"] = self.usage() if usage else None
        return f"data: {_json(body)}\n\n"

    async def chat_stream(self, request: Request):
        want_lp = self.seqs[0].params.logprobs is not None
        for i in range(len(self.seqs)):
            yield self._chunk("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}])
        async for i, ev in self.events():
            if ev.error:
                yield f"data: {_json(APIError(500, ev.error, type='server_error').body())}\n\n"
                continue
            if ev.text or ev.logprobs or ev.finish_reason is None:
                yield self._chunk("chat.completion.chunk", [{
                    "index": i, "delta": {"content": ev.text},
                    "logprobs": {"content": [_chat_lp(t) for t in ev.logprobs]} if want_lp else None,
                    "finish_reason": None}])
            if ev.finish_reason is not None:
                yield self._chunk("chat.completion.chunk", [{"index": i, "delta": {}, "logprobs": None,
                                                             "finish_reason": self._finish_reason(i)}])
        if self._wants_usage():
            yield self._chunk("chat.completion.chunk", [], usage=True)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completion shapes
    def _completion_lp(self, i, lps) -> Optional[dict]:
        if self.seqs[i].params.logprobs is None:
            return None
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [{tok: lp for _, tok, lp in t.top} for t in lps],
                "text_offset": [t.offset for t in lps]}

    def _echo(self, i) -> str:
        if not self.echo:
            return ""
        return self.s.tokenizer.decode(self.seqs[i].prompt)

    def completion_body(self) -> dict:
        choices = [{"index": i, "text": self._echo(i) + self.texts[i], "logprobs": self._completion_lp(i, self.logprobs[i]),
                    "finish_reason": self._finish_reason(i)} for i in range(len(self.seqs))]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.s.name,
                "choices": choices, "usage": self.usage()}

    async def completion_stream(self, request: Request):
        if self.echo:
            for i in range(len(self.seqs)):
                yield self._chunk("text_completion", [{"index": i, "text": self._echo(i), "logprobs": None,
                                                       "finish_reason": None}])
        async for i, ev in self.events():
            if ev.error:
                yield f"data: {_json(APIError(500, ev.error, type='server_error').body())}\n\n"
                continue
            yield self._chunk("text_completion", [{
                "index": i, "text": ev.text, "logprobs": self._completion_lp(i, ev.logprobs),
                "finish_reason": self._finish_reason(i) if ev.finish_reason is not None else None}])
        if self._wants_usage():
            yield self._chunk("text_completion", [], usage=True)
        yield "data: [DONE]\n\n"


def _chat_lp(t) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8")),
            "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))} for _, tok, lp in t.top]}


def _json(obj) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _StatusCounter:
    """Pure ASGI middleware counting responses by path and status (streaming-safe, unlike
    BaseHTTPMiddleware, which would also hide client disconnects from the streams)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"

        async def send_counting(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_counting)


_KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
