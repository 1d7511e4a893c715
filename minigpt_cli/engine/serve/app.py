"""The HTTP side of `minigpt serve`: a FastAPI application over an `Engine`.

Routes: `GET /` the chat page (`page.html`, one static file: no build step, no CDN, works
offline), `GET /health`, `GET /v1/models[/{name}]`, `POST /v1/chat/completions` and
`POST /v1/completions`, streamed as Server-Sent Events when `stream` is true.

Why it is written the way it is:
- Bodies are parsed by `protocol.parse_request`, not by FastAPI's body binding, so every refusal
  (malformed JSON, unknown field, wrong type) has OpenAI's error shape and status; any other
  failure is a 500 with that shape too, never a traceback sent to a client.
- A stream is `text/event-stream` with `data: {chunk}` lines and a final `data: [DONE]`: the exact
  framing OpenAI's clients and Open WebUI parse. Decoding runs in its own thread and hands text to
  the event loop through a queue, so the server keeps answering while a model decodes; when the
  client goes away the response's generator is closed and sets the job's `cancelled` flag, which
  stops the decoding at its next token.
- `--api-key` is checked on every `/v1` route (Bearer, as OpenAI's clients send it); the page
  itself is public and asks for the key.
This module imports fastapi at the top: only the `serve` command imports it, after checking that
the optional extra is installed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt_cli.engine.serve.completion import Cancelled, Choice, Engine, Job, ServedModel
from minigpt_cli.engine.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

PAGE = "page.html"
Log = Callable[[str], None]  # where the server's notes go (the command: stderr); never printed here
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def page_html() -> str:
    """The chat page, read from the package (shipped as package data)."""
    return resources.files("minigpt_cli.engine.serve").joinpath(PAGE).read_text(encoding="utf-8")


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _internal(error: BaseException, log: Log) -> ApiError:
    log(f"internal error: {type(error).__name__}: {error}")
    return ApiError(
        500, f"internal error: {type(error).__name__}: {error}", kind="server_error", code=None
    )


def _model_card(model: ServedModel) -> dict[str, Any]:
    loaded = model.loaded
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "minigpt",
        # minigpt's own facts, for the page and curious clients (OpenAI clients ignore them).
        "minigpt": {
            "chat": model.chat,
            "context_length": model.context_length,
            "parameters": loaded.model.num_parameters(),
            "run": str(loaded.run_dir),
        },
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(job: Job, choices: list[Choice]) -> dict[str, int]:
    completion = sum(choice.tokens for choice in choices)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def _quiet(_line: str) -> None:
    pass


def _served_line(job: Job, choices: list[Choice], seconds: float, *, stream: bool) -> str:
    """One line per answered request, for the server's log: what was asked and how fast."""
    tokens = sum(choice.tokens for choice in choices)
    rate = tokens / seconds if seconds > 0 else 0.0
    finishes = ",".join(choice.finish_reason for choice in choices)
    how = "streamed" if stream else "answered"
    return (
        f"{job.model.name}: {how} {job.prompt_tokens} prompt + {tokens} new tokens in "
        f"{seconds:.2f} s ({rate:.1f} tokens/s, {finishes})"
    )


def create_app(engine: Engine, api_key: str | None = None, log: Log = _quiet) -> FastAPI:
    """The application serving `engine`'s models; `api_key` (when given) guards `/v1`; `log`
    receives one line per note (a trimmed conversation) or internal error."""
    app = FastAPI(
        title="minigpt serve", docs_url=None, redoc_url=None, openapi_url=None, version="1"
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> Response:
        message = "Not found" if error.status_code == 404 else str(error.detail)
        code = "not_found" if error.status_code == 404 else None
        return _error_response(ApiError(error.status_code, message, code=code))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), api_key):
            what = "No API key provided" if not header else "Incorrect API key provided"
            raise ApiError(
                401,
                f"{what}: send it as 'Authorization: Bearer KEY' (the key given to --api-key)",
                code="invalid_api_key",
            )

    async def guarded(request: Request, handle: Callable[[], Awaitable[Response]]) -> Response:
        try:
            authorize(request)
            return await handle()
        except ApiError as error:
            return _error_response(error)
        except Exception as error:  # noqa: BLE001 - a client gets the error shape, not a trace
            return _error_response(_internal(error, log))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def handle() -> Response:
            return JSONResponse(
                {"object": "list", "data": [_model_card(m) for m in engine.models.values()]}
            )

        return await guarded(request, handle)

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str) -> Response:
        async def handle() -> Response:
            return JSONResponse(_model_card(engine.model(name)))

        return await guarded(request, handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle() -> Response:
            chat = parse_request(await request.body(), ChatCompletionRequest)
            job = engine.chat_job(chat)
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return await _respond(engine, job, "chat", chat.stream, include_usage, "", log)

        return await guarded(request, handle)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def handle() -> Response:
            completion = parse_request(await request.body(), CompletionRequest)
            job = engine.completion_job(completion)
            include_usage = bool(
                completion.stream_options and completion.stream_options.include_usage
            )
            echo = completion.prompt_text() if completion.echo else ""
            return await _respond(engine, job, "text", completion.stream, include_usage, echo, log)

        return await guarded(request, handle)

    return app


async def _respond(
    engine: Engine, job: Job, kind: str, stream: bool, include_usage: bool, echo: str, log: Log
) -> Response:
    """The answer to a prepared job: one JSON body, or a stream of Server-Sent Events."""
    created = int(time.time())
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
    headers = {"X-Minigpt-Notes": " ".join(job.notes)} if job.notes else {}
    for note in job.notes:
        log(f"{job.model.name}: {note}")
    if stream:
        events = _events(engine, job, kind, response_id, created, include_usage, echo, log)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    started = time.perf_counter()
    choices = await anyio.to_thread.run_sync(engine.run, job)
    log(_served_line(job, choices, time.perf_counter() - started, stream=False))
    body: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": job.model.name,
        "choices": [
            {
                "index": index,
                **(
                    {"message": {"role": "assistant", "content": choice.text}}
                    if kind == "chat"
                    else {"text": echo + choice.text}
                ),
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(choices)
        ],
        "usage": _usage(job, choices),
    }
    return JSONResponse(body, headers=headers)


async def _events(
    engine: Engine,
    job: Job,
    kind: str,
    response_id: str,
    created: int,
    include_usage: bool,
    echo: str,
    log: Log,
) -> AsyncIterator[str]:
    """Server-Sent Events of one job, decoded in its own thread (see the module doc)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: tuple[str, Any, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancelled.set()

    def work() -> None:
        try:
            choices = engine.run(job, lambda index, text: put(("delta", index, text)), cancelled)
            put(("done", choices, None))
        except Cancelled:
            put(("cancelled", None, None))
        except ApiError as error:
            put(("error", error, None))
        except Exception as error:  # noqa: BLE001 - reported in the stream, not as a trace
            put(("error", _internal(error, log), None))

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": job.model.name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def piece(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return chunk([{"index": index, "delta": delta, "finish_reason": finish}])
        return chunk(
            [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]
        )

    started = time.perf_counter()
    worker = threading.Thread(target=work, name="minigpt-serve-decode", daemon=True)
    worker.start()
    try:
        for index in range(job.n):
            if kind == "chat":
                yield piece(index, "", None, first=True)
            elif echo:
                yield piece(index, echo, None)
        backlog: deque[tuple[str, Any, Any]] = deque()
        while True:
            if not backlog:
                backlog.append(await queue.get())
            while not queue.empty():
                backlog.append(queue.get_nowait())
            event, value, extra = backlog.popleft()
            if event == "delta":
                # Text that piled up while the client was being written to goes out as one
                # chunk per choice: a slow reader costs the decoding thread nothing.
                pending = {value: extra}
                while backlog and backlog[0][0] == "delta":
                    _, index, text = backlog.popleft()
                    pending[index] = pending.get(index, "") + text
                for index, text in pending.items():
                    yield piece(index, text, None)
            elif event == "done":
                log(_served_line(job, value, time.perf_counter() - started, stream=True))
                for index, choice in enumerate(value):
                    yield piece(index, None if kind == "chat" else "", choice.finish_reason)
                if include_usage:
                    yield chunk([], _usage(job, value))
                break
            elif event == "error":
                yield _sse(value.body())
                break
            else:  # cancelled: only when the client is already gone
                return
        yield _sse("[DONE]")
    finally:
        cancelled.set()
