"""An OpenAI-compatible HTTP server for a trained checkpoint, with continuous batching and a web chat page.

    python api_server.py --model_path results/sft_final.pth --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'

Then point any OpenAI client at it (`OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=...)`), or open
http://127.0.0.1:8080/ in a browser for the chat page. Endpoints:

  POST /v1/chat/completions  messages (a system or developer message first, then user/assistant), max_tokens (or
                             max_completion_tokens), temperature, top_p, top_k, min_p, repetition_penalty, stop (a
                             string or a list), seed, stream, stream_options.include_usage.
                             A reasoning model's <think>…</think> comes back as `reasoning_content`.
  POST /v1/completions       raw text continuation of `prompt` (for pretrained models); same sampling fields. It
                             ends at <|endoftext|> or <|im_end|>, and neither is part of the text.
  GET  /v1/models            the served model.
  GET  /health               status and the number of active and queued requests; 503 with status "engine_dead"
                             and the error once the engine thread has died (restart the server then).
  GET  /                     the chat page (static; it sends the API key you type into it).

Sampling: temperature 0 or top_p 0 is greedy; top_k 0, min_p 0 and repetition_penalty 1 are off. They apply in
model.process_logits's order (repetition penalty, temperature, top-k, top-p), then min_p. max_tokens is honoured
exactly, streaming or not; left out, the reply may fill the rest of the context. Requests that do not fit get a 400
error naming the token counts. completion_tokens counts every sampled token, the stop token included. Streams are
Server-Sent Events in OpenAI's chunk format and end with `data: [DONE]`. Stop strings are matched in the visible
text (content and reasoning_content, which are stripped of surrounding whitespace). Message content is plain text: a
"<|im_end|>" typed into a message is those characters, never a turn boundary. Fields that would change the reply but
are not implemented (n > 1, logprobs, presence/frequency penalties, tools, response_format, reasoning_effort, ...)
are refused with a 400, never ignored; the request's `model` is not checked (responses name the served model).

Requests are checked before any work: POST bodies must be JSON (`Content-Type: application/json`, else 415) of at
most --max_request_bytes (else 413). Bound to a loopback address (the default), the server answers only requests
whose Host header is localhost, 127.0.0.1 or [::1] (any port; --allow_host adds names) and refuses others with 403,
so neither a web page that rebinds its DNS name to 127.0.0.1 nor a cross-site form can use it. Prompts are
tokenized on a worker thread, so a long one does not hold up other clients.

Concurrent requests share the model: serving.Engine decodes all active requests (up to --max_batch_size) in one
batched forward per step and admits new ones between steps; a client that disconnects frees its row at once.
The API key (--api_key, or the API_KEY environment variable) is required as `Authorization: Bearer KEY` on every
route except /health and the page itself.
"""
import argparse
import asyncio
import collections
import hmac
import ipaddress
import json
import os
import re
import sys
import time
import uuid
from typing import Literal

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from checkpoint import check_tokenizer
from cli import POSITIVE_INT, ArgumentParser, number, run_main
from dataset import load_tokenizer
from eval_model import encode_prompt, encode_raw, inference_device, inference_dtype, load_for_inference, stop_ids
from serving import Engine
from train_utils import ROOT

KEY_ENV = "API_KEY"
ARGS_ENV = "API_SERVER_ARGS"      # how `--workers N` hands the flags to each worker process
OPEN_PATHS = ("/", "/health")     # no API key needed
OWNER = "tiny-llm"
PAGE = os.path.join(ROOT, "static", "chat.html")
MAX_REQUEST_BYTES = 2**20         # a full context of text is a few KB; the cap bounds what one request can cost
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Fields of OpenAI's API that would change the reply but are not implemented here, with the values that change
# nothing (none: any value is refused). null is always accepted.
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
               "tool_choice": ("none",), "function_call": ("none",), "echo": (False,), "suffix": ("",),
               "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
               "reasoning_effort": (), "verbosity": (), "web_search_options": ()}
UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|[A-Z]\w*)$")  # pydantic's names for union members


# ------------------------------------------------------------------------------------------------------ errors

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


async def read_json(request, limit):
    """The raw body of a JSON POST: 415 for another content type, 413 past `limit` bytes (checked from
    Content-Length first, then while the body streams in, which also covers chunked uploads)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the body must be JSON sent as Content-Type: application/json, got "
                            f"{media_type or 'no Content-Type'}", code="unsupported_media_type")
    if int(request.headers.get("content-length", 0)) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit):
    return APIError(413, f"the request body is larger than {limit} bytes (the server's --max_request_bytes)",
                    code="request_too_large")


def parse_body(model, raw):
    """The request body as `model`; malformed JSON or a field of the wrong type is a 400 naming the first problem."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            raise APIError(400, f"malformed JSON body: {error['ctx']['error']}") from None
        path = [str(p) for p in error["loc"] if not UNION_TAG.match(str(p))]
        param = ".".join(path) or None
        raise APIError(400, f"{param or 'body'}: {error['msg']}", param=param, code="invalid_value") from None


def add_error_handlers(app):
    async def api_error(request, exc):
        return exc.response()

    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    async def server_error(request, exc):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


class RequireKey:
    """ASGI middleware: `Authorization: Bearer KEY` on every path but OPEN_PATHS (checked before the body is read,
    so a request without the key gets 401 whatever its body)."""

    def __init__(self, app, api_key):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                problem = "wrong API key" if given else "missing API key (send `Authorization: Bearer KEY`)"
                await APIError(401, problem, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequireHost:
    """ASGI middleware: only Host headers naming one of `allowed` (any port) are answered, others get 403. A page
    that rebinds its own DNS name to 127.0.0.1 still sends its own name as Host, so this keeps a loopback-only
    server out of reach of web pages."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, {host.lower() for host in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                problem = (f"Host {host!r} is not served here (only {', '.join(sorted(self.allowed))}; start the "
                           f"server with --allow_host NAME to accept another name)")
                await APIError(403, problem, code="host_not_allowed").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(header):
    """The Host header without its port: "localhost:8080" -> "localhost", "[::1]:8080" -> "[::1]"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.partition(":")[0]


# ------------------------------------------------------------------------------------------------ request bodies

class Body(BaseModel):
    """Fields shared by both completion endpoints; types are strict ("5" is not an integer), numbers finite."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    def check(self):
        """Refuse unimplemented OpenAI fields that are set to something other than their neutral value."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops

    @property
    def include_usage(self):
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Body):
    prompt: str | list[str]

    def text(self):
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"prompt: expected a string (or a list of one), got a list of {len(self.prompt)}",
                           param="prompt")
        return self.prompt[0]


# --------------------------------------------------------------------------------------------- prompt checking

def chat_messages(body):
    """The messages as dicts for encode_prompt (a developer message is a system message); a system message
    anywhere but first is an error."""
    roles = ["system" if m.role == "developer" else m.role for m in body.messages]
    for i, role in enumerate(roles[1:], 1):
        if role == "system":
            raise APIError(400, f"messages[{i}] is a {body.messages[i].role} message; only the first message may be "
                                f"a system or developer message", param=f"messages.{i}.role")
    return [{"role": role, "content": m.text()} for role, m in zip(roles, body.messages)]


def reply_budget(body, n_prompt, context, param):
    """max_tokens, checked against the room the prompt leaves in the context (the default is all of it)."""
    if n_prompt >= context:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the model's context is {context} tokens "
                            f"(prompt and reply together); shorten the {param}", param=param,
                       code="context_length_exceeded")
    room = context - n_prompt
    asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if asked is None:
        return room
    if asked > room:
        raise APIError(400, f"max_tokens={asked} does not fit: the prompt has {n_prompt} tokens and the context is "
                            f"{context}, so at most {room} new tokens fit", param="max_tokens",
                       code="context_length_exceeded")
    return asked


# ----------------------------------------------------------------------------------------------- engine events

class Channel:
    """A request's engine events (lists of them, from the scheduler thread), delivered into the event loop."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def sink(self, events):
        if not self.loop.is_closed():  # after shutdown nobody is left to read them
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    async def events(self):
        """Yield events up to the request's last one ("finish", "error", or "disconnect" from watch())."""
        while True:
            for event in await self.queue.get():
                yield event
                if event[0] in ("finish", "error", "disconnect"):
                    return

    async def watch(self, request):
        """Put a "disconnect" event when the client goes away (the body is read, so receive() waits for that)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait([("disconnect",)])


class Job:
    """One request's generation: the engine.submit arguments, the response ids, and helpers for the response."""

    def __init__(self, server, body, prompt_ids, max_tokens, chat):
        self.server, self.body, self.prompt_ids, self.max_tokens, self.chat = server, body, prompt_ids, max_tokens, chat
        self.stops = body.check()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def submit(self, sink):
        body = self.body
        # Both endpoints end at <|im_end|> too: a chat model's turn end is never part of a completion's text.
        ends = stop_ids(self.server.tokenizer, raw=False)
        return self.server.engine.submit(
            self.prompt_ids, self.max_tokens, sink, chat=self.chat, stop_ids=ends, stop_strings=self.stops,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, seed=body.seed)

    def usage(self, completion_tokens):
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def envelope(self, obj, choices, **extra):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name,
                "choices": choices, **extra}

    async def collect(self, request):
        """Run to the end; returns (texts by section, finish_reason, completion_tokens), or None if the client
        disconnected first (its row is freed)."""
        channel = Channel()
        handle = self.submit(channel.sink)
        watcher = asyncio.create_task(channel.watch(request))
        texts = collections.defaultdict(str)
        try:
            async for event in channel.events():
                if event[0] == "error":
                    raise APIError(500, event[1], kind="server_error")
                if event[0] == "disconnect":
                    return None
                if event[0] == "finish":
                    return texts, event[1], event[2]
                texts[event[0]] += event[1]
        finally:
            watcher.cancel()
            handle.cancel()

    async def stream(self, first_chunk, chunk):
        """SSE lines: first_chunk (if any), one chunk per text piece (chunk(section, text)), the finish chunk, the
        usage chunk if asked, then [DONE]. Leaving early (the client disconnected) frees the request's row."""
        channel = Channel()
        handle = self.submit(channel.sink)
        try:
            if first_chunk:
                yield sse(first_chunk)
            async for event in channel.events():
                if event[0] == "error":
                    yield sse(APIError(500, event[1], kind="server_error").body())
                    break
                if event[0] == "finish":
                    yield sse(chunk(None, None, finish_reason=event[1]))
                    if self.body.include_usage:
                        yield sse(self.envelope(self.chunk_object, [], usage=self.usage(event[2])))
                else:
                    yield sse(chunk(*event))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def streaming(body_iterator):
    return StreamingResponse(body_iterator, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -------------------------------------------------------------------------------------------------- the routes

class Server:
    """What the routes share: the engine (which owns the model), a tokenizer for prompts, the served name."""

    def __init__(self, engine, tokenizer, model_name):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.context = engine.config.max_seq_len
        self.created = int(time.time())

    def check_engine(self):
        if not self.engine.alive:
            raise APIError(503, f"the engine thread is not running ({self.engine.failure or 'stopped'}); restart "
                                f"the server", kind="server_error", code="engine_dead")


async def chat_completions(server, body, request):
    messages = chat_messages(body)
    server.check_engine()
    # Tokenizing a long prompt takes a while: on a worker thread the event loop goes on serving the others.
    ids = await asyncio.to_thread(encode_prompt, server.tokenizer, messages)
    job = Job(server, body, ids, reply_budget(body, len(ids), server.context, "messages"), chat=True)
    field = {"answer": "content", "reasoning": "reasoning_content"}

    def chunk(section, text, finish_reason=None):
        delta = {} if section is None else {field[section]: text}
        return job.envelope(job.chunk_object,
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    if body.stream:
        first = job.envelope(job.chunk_object, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}])
        return streaming(job.stream(first, chunk))
    result = await job.collect(request)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    texts, finish_reason, n = result
    message = {"role": "assistant", "content": texts["answer"]}
    if texts["reasoning"]:
        message["reasoning_content"] = texts["reasoning"]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return job.envelope("chat.completion", [choice], usage=job.usage(n))


async def completions(server, body, request):
    text = body.text()
    server.check_engine()
    ids = await asyncio.to_thread(encode_raw, server.tokenizer, text)
    job = Job(server, body, ids, reply_budget(body, len(ids), server.context, "prompt"), chat=False)

    def chunk(section, text, finish_reason=None):
        return job.envelope(job.chunk_object, [{"index": 0, "text": text or "", "logprobs": None,
                                                 "finish_reason": finish_reason}])

    if body.stream:
        return streaming(job.stream(None, chunk))
    result = await job.collect(request)
    if result is None:
        return Response(status_code=499)
    texts, finish_reason, n = result
    return chunk("text", texts["text"], finish_reason) | {"usage": job.usage(n)}


def create_app(engine, tokenizer, model_name, api_key=None, max_request_bytes=MAX_REQUEST_BYTES, allowed_hosts=None):
    """The FastAPI app; its lifespan starts and stops the engine's scheduler thread. allowed_hosts: the Host names
    answered (None: any)."""
    server = Server(engine, tokenizer, model_name)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tiny-llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(RequireHost, allowed=allowed_hosts)  # added last, so it runs first
    model_card = {"id": model_name, "object": "model", "created": server.created, "owned_by": OWNER}
    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions")
    async def chat_route(request: Request):
        body = parse_body(ChatBody, await read_json(request, max_request_bytes))
        return await chat_completions(server, body, request)

    @v1.post("/completions")
    async def completions_route(request: Request):
        body = parse_body(CompletionBody, await read_json(request, max_request_bytes))
        return await completions(server, body, request)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{model_name}'", param="model",
                           code="model_not_found")
        return model_card

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine_dead", "model": model_name,
                                 "error": engine.failure or "the engine thread is not running"}, status_code=503)
        return {"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queued,
                "max_batch_size": engine.max_batch_size}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    app.include_router(v1)
    return app


# --------------------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--model_path", default=os.path.join("results", "sft_final.pth"),
      help="a *_final.pth, a latest_checkpoint.pth or a *_final/ safetensors folder")
    a("--lora_path", default=None, help="LoRA adapters (SFT.py --lora_rank writes save_dir/lora_sft.pth) to merge in")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"))
    a("--model_name", default=None, help="the model id clients see (default: the checkpoint's file name, e.g. "
      "sft_final)")
    a("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the server to the network (set an "
      "API key then)")
    a("--port", type=number(int, 1, 65535), default=8080)
    a("--allow_host", action="append", default=None, metavar="NAME", help="bound to loopback, the server answers only "
      "Host headers localhost, 127.0.0.1 and [::1]; this accepts another name too (repeatable; '*' accepts any, "
      "e.g. behind a reverse proxy that sends its own name)")
    a("--api_key", default=os.environ.get(KEY_ENV), help=f"require `Authorization: Bearer KEY` (default: the "
      f"{KEY_ENV} environment variable, which other users cannot read in the process list; unset = no key)")
    a("--max_request_bytes", type=POSITIVE_INT, default=MAX_REQUEST_BYTES, help="larger request bodies get 413")
    a("--max_batch_size", type=POSITIVE_INT, default=32, help="requests decoded together; more wait in a queue (the "
      "KV cache for this many full-context rows is allocated at start)")
    a("--workers", type=POSITIVE_INT, default=1, help="worker processes, each with its own copy of the model, its "
      "own batching scheduler and --max_batch_size rows, sharing the port. 1 is right for one GPU: a single process "
      "batches all concurrent requests into shared forward passes, while N processes hold N copies and batch "
      "separately. N > 1 helps on a many-core CPU (each worker gets cores/N threads) or to overlap Python "
      "overhead for very small models")
    a("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantised linear layers")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="weights' dtype (auto: float32 on CPU, bfloat16 on GPU)")
    a("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not os.path.exists(args.model_path):
        p.error(f"--model_path {args.model_path}: no such checkpoint (train one, e.g. `python SFT.py`, or pass "
                f"another path)")
    return args


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def allowed_hosts(args):
    """The Host names to answer: localhost, 127.0.0.1, [::1] and --allow_host when bound to loopback, else any."""
    extra = tuple(args.allow_host or ())
    if not is_loopback(args.host) or "*" in extra:
        return None
    return LOOPBACK_HOSTS + extra


def build_app(args):
    """Load the model and tokenizer named by the flags and wrap them in the app."""
    tokenizer = load_tokenizer(args.tokenizer_path)  # first: a mistyped path fails before the model loads
    device = inference_device(args.device)
    model, meta = load_for_inference(args.model_path, device, inference_dtype(args.dtype, device), args.lora_path,
                                     args.quantize)
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    name = args.model_name or os.path.basename(os.path.normpath(args.model_path)).removesuffix(".pth")
    # The engine decodes on its own thread with its own tokenizer; the routes encode prompts with this one.
    engine = Engine(model, load_tokenizer(args.tokenizer_path), args.max_batch_size)
    quantized = f" ({args.quantize} weights)" if args.quantize != "none" else ""
    print(f"{args.model_path}: {meta.get('stage', 'unknown')} stage, {model.config.param_counts()[0]:,} parameters"
          f"{quantized}, context {model.config.max_seq_len}, on {device}; serving as '{name}', batches of up to "
          f"{args.max_batch_size} (KV cache {engine.cache_bytes / 2**20:.0f} MiB)", file=sys.stderr)
    return create_app(engine, tokenizer, name, args.api_key, args.max_request_bytes, allowed_hosts(args))


def worker_app():
    """The app of one `--workers N` process: the flags come from the parent through the environment."""
    args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
    if inference_device(args.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    return build_app(args)


def main(argv=None):
    args = parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach the port can use the "
              f"model (set --api_key or {KEY_ENV})", file=sys.stderr)
    if args.workers == 1:
        app = build_app(args)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
        return
    load_tokenizer(args.tokenizer_path)  # a bad path is one line here, not a traceback in every worker
    os.environ[ARGS_ENV] = json.dumps(vars(args))
    # A spawned worker re-imports this script (torch, transformers) before it can answer the supervisor's health
    # pings; on a busy machine that exceeds uvicorn's 5 s default and the worker would be killed and respawned.
    uvicorn.run("api_server:worker_app", factory=True, app_dir=ROOT, workers=args.workers, host=args.host,
                port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5, timeout_worker_healthcheck=60)


if __name__ == "__main__":
    run_main(main)
