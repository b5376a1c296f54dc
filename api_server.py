"""An OpenAI-compatible HTTP server for a trained checkpoint, with continuous batching and a web chat page.

    python api_server.py --model_path results/sft_final.pth --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'

Then point any OpenAI client at it (`OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=...)`), or open
http://127.0.0.1:8080/ in a browser for the chat page. Endpoints:

  POST /v1/chat/completions  messages (a system or developer message first, then user, assistant and tool
                             messages), max_tokens (or max_completion_tokens), temperature, top_p, top_k, min_p,
                             repetition_penalty, stop (a string or a list), seed, stream,
                             stream_options.include_usage, tools, tool_choice, parallel_tool_calls,
                             chat_template_kwargs.enable_thinking.
                             A reasoning model's <think>…</think> comes back as `reasoning_content`.
  POST /v1/completions       raw text continuation of `prompt` (for pretrained models); same sampling fields. It
                             ends at <|endoftext|> or <|im_end|>, and neither is part of the text.
  GET  /v1/models            the served model.
  GET  /health               status and the number of active and queued requests; 503 with status "engine_dead"
                             and the error once the engine thread has died (restart the server then).
  GET  /                     the chat page (static; it sends the API key you type into it).

Tool calling, as OpenAI's API has it. `tools` are OpenAI function schemas ({"type": "function", "function":
{"name", "description", "parameters"}}); the chat template writes them, as sent, into the system turn. The model's
calls come back as `message.tool_calls` (ids "call_…", arguments a JSON string) with finish_reason "tool_calls"
("length" if max_tokens cut the reply) and content null, or the text the model wrote before the calls. Streamed,
each call is two `delta.tool_calls` chunks (index, id, type, name and empty arguments, then the arguments), sent
once the call is complete. A call that is not {"name": ..., "arguments": {...}} JSON comes back as content,
"<tool_call>…</tool_call>" and all. tool_choice: "auto" (the default with tools: the model decides), "none" (the
default without tools: <tool_call> is never sampled), "required" (the reply starts with <tool_call>), or
{"type": "function", "function": {"name": N}} (the reply starts with the call of N up to its arguments, which the
model writes). A forced call counts as prompt tokens and cannot follow reasoning (enable_thinking true is refused
with it). parallel_tool_calls false ends the reply at its first </tool_call>. Send the results back as
{"role": "tool", "tool_call_id", "content"} messages after the assistant message with the calls (its content may
be null); they are matched to the calls by position, as the template renders them. An assistant message's
`reasoning_content` is accepted and left out of the prompt (past reasoning is dropped, as Qwen3's template drops
it for past turns). The legacy `functions`/`function_call` are refused: send tools/tool_choice.

chat_template_kwargs takes only enable_thinking (other keys are refused): false ends the generation prompt with an
empty <think></think> so the model answers at once, true with <think> so it reasons first; left out, the model
decides (train_tokenizer.CHAT_TEMPLATE).

Sampling: temperature 0 or top_p 0 is greedy; top_k 0, min_p 0 and repetition_penalty 1 are off. They apply in
model.process_logits's order (repetition penalty, temperature, top-k, top-p), then min_p. max_tokens is honoured
exactly, streaming or not; left out, the reply may fill the rest of the context. Requests that do not fit get a 400
error naming the token counts. completion_tokens counts every sampled token, the stop token included. Streams are
Server-Sent Events in OpenAI's chunk format and end with `data: [DONE]`. Stop strings are matched in the visible
text (content and reasoning_content, which are stripped of surrounding whitespace). Message content is plain text: a
"<|im_end|>" typed into a message is those characters, never a turn boundary. Fields that would change the reply but
are not implemented (n > 1, logprobs, presence/frequency penalties, response_format, reasoning_effort, ...) are
refused with a 400, never ignored; the request's `model` is not checked (responses name the served model).

Requests are checked before any work: POST bodies must be JSON (`Content-Type: application/json`, else 415) of at
most --max_request_bytes (else 413). Bound to a loopback address (the default), the server answers only requests
whose Host header is localhost, 127.0.0.1 or [::1] (any port; --allow_host adds names) and refuses others with 403,
so neither a web page that rebinds its DNS name to 127.0.0.1 nor a cross-site form can use it. Prompts are
tokenized on a worker thread, so a long one does not hold up other clients.

Concurrent requests share the model: serving.Engine decodes all active requests (up to --max_batch_size) in one
batched forward per step and admits new ones between steps, the waiting prompts prefilled together (up to
--prefill_tokens per forward); a client that disconnects frees its row at once.
The API key (--api_key, or the API_KEY environment variable) is required as `Authorization: Bearer KEY` on every
route except /health and the page itself.
"""
import argparse
import asyncio
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
from dataset import encode_text, load_tokenizer, tool_arguments
from inference import (encode_prompt, encode_raw, inference_device, inference_dtype, load_for_inference, stop_ids,
                       thinking_start)
from serving import Engine
from tools import openai_tool_calls
from train_tokenizer import END_TOOL_CALL, TOOL_CALL
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
# functions/function_call: OpenAI's deprecated form of tools/tool_choice, refused with the others.
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "logit_bias": ({},), "functions": ([],), "function_call": ("none",),
               "echo": (False,), "suffix": ("",), "response_format": ({"type": "text"},), "modalities": (["text"],),
               "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": ()}
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
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
        raise invalid(error) from None


def validated(model, value, param):
    """A part of the body (kept as plain JSON, e.g. to render it as sent) checked as `model`, or a 400 naming the
    first problem under `param`."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise invalid(e.errors()[0], (param,)) from None


def invalid(error, prefix=()):
    """The 400 for one pydantic error: param is its dotted location, e.g. "messages.0.content"."""
    path = [str(p) for p in (*prefix, *error["loc"]) if not UNION_TAG.match(str(p))]
    param = ".".join(path) or None
    if error["type"] == "extra_forbidden":
        return APIError(400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter")
    return APIError(400, f"{param or 'body'}: {error['msg']}", param=param, code="invalid_value")


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


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(min_length=1)
    arguments: str | dict  # OpenAI sends a JSON string of an object; the object itself is taken too


class ToolCall(BaseModel):
    """A call in an assistant message, as OpenAI returns it (and this server does)."""
    model_config = ConfigDict(strict=True)
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    # developer: OpenAI's newer name for system; tool: a tool's result, answering an assistant's tool call.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null only in an assistant message with tool_calls
    tool_calls: list[ToolCall] | None = None      # assistant messages only
    tool_call_id: str | None = None               # required in tool messages
    reasoning_content: str | None = None          # accepted and dropped: past reasoning is not in the prompt

    def text(self):
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema; the model reads it as written
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of `tools`: an OpenAI function schema."""
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: that function is called."""
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: NamedFunction


class TemplateKwargs(BaseModel):
    """chat_template_kwargs: the chat template's switches (train_tokenizer.CHAT_TEMPLATE); others are refused."""
    model_config = ConfigDict(strict=True, extra="forbid")
    enable_thinking: bool | None = None


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict] | None = None         # checked as Tool, rendered as sent (the template writes them as JSON)
    tool_choice: str | dict | None = None   # "none", "auto", "required" or a NamedToolChoice
    parallel_tool_calls: bool = True
    chat_template_kwargs: TemplateKwargs | None = None

    @property
    def enable_thinking(self):
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None


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
    """The messages as dicts for encode_prompt (a developer message is a system message). Refused: a system
    message anywhere but first, a message without content (an assistant one may have tool_calls instead),
    tool_calls outside assistant messages or with arguments that are not a JSON object, and a tool message without
    a tool_call_id or without an assistant tool call before it to answer. Tool results are matched to the calls by
    position, as the chat template renders them; reasoning_content is dropped."""
    messages, open_calls = [], 0  # open_calls: tool calls of the last assistant message not yet answered
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        check_message(m, i, role, open_calls)
        message = {"role": role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        messages.append(message)
        open_calls = len(m.tool_calls or []) if role == "assistant" else open_calls - 1 if role == "tool" else 0
    return messages


def check_message(m, i, role, open_calls):
    """The 400 for message i's first problem (see chat_messages)."""
    if role == "system" and i > 0:
        raise APIError(400, f"messages[{i}] is a {m.role} message; only the first message may be a system or "
                            f"developer message", param=f"messages.{i}.role")
    if m.tool_calls is not None and role != "assistant":
        raise APIError(400, f"messages[{i}] is a {m.role} message; only assistant messages may have tool_calls",
                       param=f"messages.{i}.tool_calls")
    if m.content is None and not (role == "assistant" and m.tool_calls):
        needs = "content or tool_calls" if role == "assistant" else "content (a string or a list of text parts)"
        raise APIError(400, f"messages[{i}] ({m.role}) needs {needs}", param=f"messages.{i}.content")
    for k, call in enumerate(m.tool_calls or []):
        try:
            tool_arguments(call.function.model_dump())
        except ValueError as e:
            raise APIError(400, f"messages[{i}].tool_calls[{k}]: {e}",
                           param=f"messages.{i}.tool_calls.{k}.function.arguments") from None
    if role == "tool" and m.tool_call_id is None:
        raise APIError(400, f"messages[{i}]: a tool message needs the tool_call_id of the call it answers",
                       param=f"messages.{i}.tool_call_id")
    if role == "tool" and open_calls < 1:
        raise APIError(400, f"messages[{i}] is a tool message without an assistant tool call before it to answer "
                            f"(one tool message per call, right after the assistant message that made them)",
                       param=f"messages.{i}.role")


def request_tools(body):
    """The tools as sent (None for none), each checked as an OpenAI function schema with a unique name."""
    names = set()
    for k, tool in enumerate(body.tools or []):
        name = validated(Tool, tool, f"tools.{k}").function.name
        if name in names:
            raise APIError(400, f"tools[{k}]: a second function named {name!r}", param=f"tools.{k}.function.name")
        names.add(name)
    return body.tools or None


def tool_choice(body, tools):
    """(mode, name): mode "none", "auto", "required" or "function" (name: the function to call). Left out: "auto"
    with tools, "none" without (as OpenAI has it). Forcing a call needs tools, and cannot follow reasoning
    (enable_thinking true)."""
    choice = body.tool_choice
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, dict):
        mode, name = "function", validated(NamedToolChoice, choice, "tool_choice").function.name
        names = [tool["function"]["name"] for tool in tools or []]
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools (they are: "
                                f"{', '.join(names) or 'none'})", param="tool_choice")
    elif choice in ("none", "auto", "required"):
        mode, name = choice, None
    else:
        raise APIError(400, f'tool_choice: expected "none", "auto", "required" or {{"type": "function", '
                            f'"function": {{"name": ...}}}}, got {choice!r}', param="tool_choice")
    if mode == "required" and not tools:
        raise APIError(400, "tool_choice asks for a tool call but the request has no tools", param="tool_choice")
    if mode in ("required", "function") and body.enable_thinking:
        raise APIError(400, "a forced tool call (tool_choice \"required\" or a named function) starts the reply, so "
                            "it cannot come after reasoning: leave chat_template_kwargs.enable_thinking out or false, "
                            "or use tool_choice \"auto\"", param="tool_choice")
    return mode, name


def forced_call(tokenizer, mode, name):
    """The ids that start the reply when tool_choice forces a call: <tool_call> ("required"), then for a named
    function its start up to '"arguments":', so the model writes only the arguments. The text stops before the
    space: the pre-tokenizer splits there, so these ids are the ones the whole call has in training."""
    if mode in ("none", "auto"):
        return []
    call = [tokenizer.convert_tokens_to_ids(TOOL_CALL)]
    if mode == "required":
        return call
    return call + encode_text(tokenizer, f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments":')


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
    """One request's generation: the engine.submit arguments, the response ids, and helpers for the response.
    generation: more engine.submit arguments (banned_ids, reply_start); more_stops: stop ids besides the turn end."""

    def __init__(self, server, body, prompt_ids, max_tokens, chat, more_stops=(), **generation):
        self.server, self.body, self.prompt_ids, self.max_tokens, self.chat = server, body, prompt_ids, max_tokens, chat
        self.more_stops, self.generation = list(more_stops), generation
        self.stops = body.check()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def submit(self, sink):
        body = self.body
        # Both endpoints end at <|im_end|> too: a chat model's turn end is never part of a completion's text.
        ends = stop_ids(self.server.tokenizer, raw=False) + self.more_stops
        return self.server.engine.submit(
            self.prompt_ids, self.max_tokens, sink, chat=self.chat, stop_ids=ends, stop_strings=self.stops,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, seed=body.seed, **self.generation)

    def usage(self, completion_tokens):
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def envelope(self, obj, choices, **extra):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name,
                "choices": choices, **extra}

    async def collect(self, request):
        """Run to the end; returns (the (section, text) and ("tool_call", call) pieces in order, finish_reason,
        completion_tokens), or None if the client disconnected first (its row is freed)."""
        channel = Channel()
        handle = self.submit(channel.sink)
        watcher = asyncio.create_task(channel.watch(request))
        pieces = []
        try:
            async for event in channel.events():
                if event[0] == "error":
                    raise APIError(500, event[1], kind="server_error")
                if event[0] == "disconnect":
                    return None
                if event[0] == "finish":
                    return pieces, event[1], event[2]
                pieces.append(event)
        finally:
            watcher.cancel()
            handle.cancel()

    async def stream(self, first_chunk, chunks):
        """SSE lines: first_chunk (if any), the chunks(event) of each engine event (the pieces, then the finish),
        the usage chunk if asked, then [DONE]. Leaving early (the client disconnected) frees the request's row."""
        channel = Channel()
        handle = self.submit(channel.sink)
        try:
            if first_chunk:
                yield sse(first_chunk)
            async for event in channel.events():
                if event[0] == "error":
                    yield sse(APIError(500, event[1], kind="server_error").body())
                    break
                for chunk in chunks(event):
                    yield sse(chunk)
                if event[0] == "finish" and self.body.include_usage:
                    yield sse(self.envelope(self.chunk_object, [], usage=self.usage(event[2])))
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


def chat_finish(finish_reason, n_calls):
    """A reply that ended by itself after making tool calls finishes with "tool_calls", as OpenAI's do."""
    return "tool_calls" if n_calls and finish_reason == "stop" else finish_reason


async def chat_job(server, body):
    """The Job of a chat request: the prompt (tools and the thinking switch rendered by the chat template, a
    forced call's start appended) and what tool_choice asks of the engine."""
    messages, tools = chat_messages(body), request_tools(body)
    mode, name = tool_choice(body, tools)
    server.check_engine()
    tokenizer = server.tokenizer
    # Tokenizing a long prompt takes a while: on a worker thread the event loop goes on serving the others.
    ids = await asyncio.to_thread(encode_prompt, tokenizer, messages, tools, body.enable_thinking)
    forced = forced_call(tokenizer, mode, name)
    ids += forced
    tool_call, end_call = tokenizer.convert_tokens_to_ids([TOOL_CALL, END_TOOL_CALL])
    return Job(server, body, ids, reply_budget(body, len(ids), server.context, "messages"), chat=True,
               more_stops=[end_call] if mode != "none" and not body.parallel_tool_calls else [],  # one call at most
               banned_ids=[tool_call] if mode == "none" else [],
               reply_start=thinking_start(tokenizer, body.enable_thinking) + forced)


async def chat_completions(server, body, request):
    job = await chat_job(server, body)
    field = {"answer": "content", "reasoning": "reasoning_content"}
    calls = []  # the tool calls streamed so far

    def delta_chunk(delta, finish_reason=None):
        return job.envelope(job.chunk_object,
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def chunks(event):
        """One chunk per text piece; a tool call as OpenAI streams one (its id, type and name with empty arguments,
        then the arguments); the finish."""
        if event[0] == "finish":
            return [delta_chunk({}, chat_finish(event[1], len(calls)))]
        if event[0] != "tool_call":
            return [delta_chunk({field[event[0]]: event[1]})]
        call = openai_tool_calls([event[1]])[0]
        calls.append(call)
        head = {"index": len(calls) - 1, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        arguments = {"index": len(calls) - 1, "function": {"arguments": call["function"]["arguments"]}}
        return [delta_chunk({"tool_calls": [head]}), delta_chunk({"tool_calls": [arguments]})]

    if body.stream:
        # No content yet: a reply that turns out to be only tool calls has content null, as with OpenAI.
        first = delta_chunk({"role": "assistant"})
        return streaming(job.stream(first, chunks))
    result = await job.collect(request)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    pieces, finish_reason, n = result
    texts = {section: "".join(text for kind, text in pieces if kind == section) for section in field}
    tool_calls = openai_tool_calls([call for kind, call in pieces if kind == "tool_call"])
    message = {"role": "assistant", "content": texts["answer"]}
    if tool_calls:
        message.update(content=texts["answer"] or None, tool_calls=tool_calls)
    if texts["reasoning"]:
        message["reasoning_content"] = texts["reasoning"]
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": chat_finish(finish_reason, len(tool_calls))}
    return job.envelope("chat.completion", [choice], usage=job.usage(n))


async def completions(server, body, request):
    text = body.text()
    server.check_engine()
    ids = await asyncio.to_thread(encode_raw, server.tokenizer, text)
    job = Job(server, body, ids, reply_budget(body, len(ids), server.context, "prompt"), chat=False)

    def chunk(text, finish_reason=None):
        return job.envelope(job.chunk_object, [{"index": 0, "text": text, "logprobs": None,
                                                 "finish_reason": finish_reason}])

    def chunks(event):
        return [chunk("", event[1]) if event[0] == "finish" else chunk(event[1])]

    if body.stream:
        return streaming(job.stream(None, chunks))
    result = await job.collect(request)
    if result is None:
        return Response(status_code=499)
    pieces, finish_reason, n = result
    return chunk("".join(text for _, text in pieces), finish_reason) | {"usage": job.usage(n)}


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
    a("--prefill_tokens", type=POSITIVE_INT, default=2048, help="waiting prompts are prefilled together in one "
      "forward of up to this many tokens (each padded to the longest; a longer prompt goes alone): more admits a "
      "burst of requests sooner, less keeps the running requests' decode steps closer together")
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


def cpu_has_amx():
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so absent in some torch versions
    return bool(is_supported and is_supported())


def build_app(args):
    """Load the model and tokenizer named by the flags and wrap them in the app."""
    tokenizer = load_tokenizer(args.tokenizer_path)  # first: a mistyped path fails before the model loads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # only the engine's thread may run torch multi-threaded (serving.py: Threads)
    device = inference_device(args.device)
    model, meta = load_for_inference(args.model_path, device, inference_dtype(args.dtype, device), args.lora_path,
                                     args.quantize)
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    name = args.model_name or os.path.basename(os.path.normpath(args.model_path)).removesuffix(".pth")
    # The engine decodes on its own thread with its own tokenizer; the routes encode prompts with this one.
    engine = Engine(model, load_tokenizer(args.tokenizer_path), args.max_batch_size, args.prefill_tokens, threads)
    quantized = f" ({args.quantize} weights)" if args.quantize != "none" else ""
    print(f"{args.model_path}: {meta.get('stage', 'unknown')} stage, {model.config.param_counts()[0]:,} parameters"
          f"{quantized}, context {model.config.max_seq_len}, on {device}; serving as '{name}', batches of up to "
          f"{args.max_batch_size} (KV cache {engine.cache_bytes / 2**20:.0f} MiB)", file=sys.stderr)
    if device.type == "cpu" and next(model.parameters()).dtype == torch.float32 and cpu_has_amx():
        print("this CPU multiplies bfloat16 matrices in hardware (AMX): --dtype bfloat16 serves concurrent requests "
              "much faster (README: Benchmarks, Serving)", file=sys.stderr)
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
