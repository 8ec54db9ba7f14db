"""The ASGI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Every answer goes through the engine's batch scheduler (``engine/batching.py``): requests that
arrive while others are being decoded join their batch. The request is checked first — JSON,
fields, image, the prompt's length against the context — so a client's mistake is a 4xx in
OpenAI's error shape and never reaches the engine; anything unexpected is a 500 whose details go
to the server's log, not to the client. A client that disconnects has its answer stopped before
the next decode step.

Guards (``ServerSettings``): a body size limit (413), an API key (401, ``Authorization: Bearer``),
JSON bodies only (415: a web page cannot send one without the browser asking the server first),
and, on a loopback address, Host headers naming loopback only (a DNS-rebinding page gets 403).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tinyv.engine.batching import DEFAULT_MAX_BATCH, Batcher
from tinyv.errors import TinyVError
from tinyv.serve.chat import parse_chat_request
from tinyv.serve.images import CheckedImages, ImagePolicy, load_image
from tinyv.serve.openai_shapes import ApiError, Completion, error_body, model_list, usage

log = logging.getLogger("tinyv.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    model: str = "tinyv"  # the model id clients see
    api_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = 20 << 20
    images: ImagePolicy = field(default_factory=ImagePolicy)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host header names accepted (None: any)


def create_app(engine, settings: ServerSettings = ServerSettings()) -> Starlette:
    """The app serving ``engine``; its batch scheduler is ``app.state.batcher``."""
    batcher = Batcher(engine, settings.max_batch)
    checked_images = CheckedImages()
    created = int(time.time())

    async def chat_completions(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "send the request as JSON (Content-Type: application/json)")
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        chat = parse_chat_request(body, engine.prompt_format)
        # decoding the image and tokenizing the conversation can take a while: off the event loop
        await asyncio.to_thread(check_context, engine, chat.prompt)
        image = await asyncio.to_thread(load_image, chat.image_url, settings.images, checked_images)
        try:
            stream = batcher.submit(image, prompt=chat.prompt, stop_strings=chat.stop, **chat.options)
        except TinyVError as e:
            raise ApiError(400, str(e)) from None
        watcher = asyncio.create_task(_close_on_disconnect(request, stream))
        try:
            first = await _first_step(stream)
        except BaseException:
            watcher.cancel()
            stream.close()
            raise
        completion = Completion(settings.model)
        if chat.stream:
            return StreamingResponse(_events(completion, stream, first, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            trim, text, last = Trim(), [], first
            text.append(trim.push(first.text))
            while last.finish_reason is None:
                last = await _next_step(stream)
                text.append(trim.push(last.text))
        finally:
            watcher.cancel()
            stream.close()
        return JSONResponse(completion.message("".join(text), last.finish_reason, usage(last.timings)))

    async def models(request: Request):
        return JSONResponse(model_list(settings.model, created))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": settings.model, **batcher.stats()})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # answers still running end; their clients' streams close

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return Guard(app, settings)


def check_context(engine, prompt: str) -> None:
    """A prompt (image included) that leaves no room for an answer is the client's 400."""
    before, after = engine.prompt_format.split(prompt=prompt)
    n = len(engine.tokenizer.encode(before)) + engine.config.qformer.num_queries + len(engine.tokenizer.encode(after))
    limit = engine.phi.cfg.max_positions
    if n >= limit:
        raise ApiError(400, f"the conversation is {n} tokens (the image's {engine.config.qformer.num_queries} "
                            f"included) but the model's context is {limit}; shorten it or start a new one",
                       "messages", "context_length_exceeded")


class Trim:
    """Streamed pieces with the answer's leading and trailing whitespace left out (what
    ``tinyv caption`` prints): trailing whitespace is held until text follows it."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        return body


async def _close_on_disconnect(request: Request, stream) -> None:
    """Close ``stream`` when the client disconnects (the body has been read: the next message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.close()


async def _next_step(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        if stream.closed:  # the client went away (or the server is stopping): nobody reads this
            raise ApiError(503, "the request was cancelled", code="cancelled") from None
        raise RuntimeError("an answer ended without its last step") from None
    except TinyVError as e:  # e.g. an image the vision graph cannot take
        raise ApiError(400, str(e)) from None


_first_step = _next_step  # before the response starts: its error is the response


async def _events(completion: Completion, stream, first, watcher):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    try:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        trim, step = Trim(), first
        while True:
            # the steps that came meanwhile go out as one chunk (a client or loop that fell behind
            # catches up instead of falling further behind)
            if step.finish_reason is None:
                for later in stream.ready():
                    step = dataclasses.replace(later, text=step.text + later.text)
                    if step.finish_reason is not None:
                        break
            piece = trim.push(step.text)
            if step.finish_reason is not None:
                if piece:
                    yield _sse(completion.chunk({"content": piece}))
                yield _sse(completion.chunk({}, step.finish_reason, usage(step.timings)))
                break
            if piece:
                yield _sse(completion.chunk({"content": piece}))
                # let the event loop run between chunks, so a disconnect is seen at the next token
                # even when many are ready (writes never wait while the socket has room)
                await asyncio.sleep(0)
            step = await _next_step(stream)
    except ApiError as e:  # the headers are sent: the error goes in the stream
        yield _sse(e.body())
    except Exception:  # noqa: BLE001 - logged for the operator, a plain message for the client
        log.exception("an answer failed")
        yield _sse(error_body(500, "internal error in the server (see its log)"))
    finally:
        watcher.cancel()
        stream.close()
    yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception):
    # starlette re-raises it after this response, and the ASGI server logs the traceback
    return JSONResponse(error_body(500, "internal error in the server (see its log)"), status_code=500)


class Guard:
    """ASGI middleware in front of the app: Host header, API key and body size, answered in
    OpenAI's error shape before the app sees the request."""

    def __init__(self, app: Starlette, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        s = self.settings
        if s.allowed_hosts is not None and _host_name(headers.get("host", "")) not in s.allowed_hosts:
            return await _reply(send, ApiError(403, "this server answers requests addressed to localhost only"))
        if s.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
                return await _reply(send, ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                                   code="invalid_api_key"))
        limit = s.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reply(send, _too_large(limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        return await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit} bytes; send a smaller image",
                    code="request_too_large")


def _host_name(host: str) -> str:
    """The name part of a Host header (``[::1]:8080`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _reply(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
