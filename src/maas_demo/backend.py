"""OpenAI-compatible demo model server standing in for vLLM.

Serves deterministic fake completions with vLLM's exact usage shapes, so the gateway's usage
accounting can be tested without a GPU. Every model is served under ``/<namespace>/<name>``,
mirroring how the platform routes, e.g. ``POST /llm/tiny/v1/chat/completions``.

Test hooks (not under a model prefix):

* ``GET /_demo/requests`` / ``DELETE /_demo/requests``: headers of the last 100 requests.
* request header ``x-demo-fail: <4xx|5xx>`` answers that status with an OpenAI error body;
  ``x-demo-fail: reset`` drops the connection without any response.

Run: ``python -m maas_demo.backend --addr 127.0.0.1:8000 --model llm/tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("maas_demo.backend")

DEFAULT_MODELS: tuple[tuple[str, str], ...] = (("llm", "tiny"),)
DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 256
EMBEDDING_DIM = 8
RECORDED_REQUESTS = 100
# Per chat message overhead, a stand-in for the role/template tokens a real chat template adds.
CHAT_MESSAGE_OVERHEAD = 4

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Model:
    namespace: str
    name: str
    created: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def card(self) -> Json:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.namespace,
            "root": self.name,
            "parent": None,
            "max_model_len": MAX_TOKENS_CAP * 2,
        }


@dataclass(frozen=True)
class Settings:
    models: dict[str, Model]
    token_delay_s: float


SETTINGS_KEY = web.AppKey("settings", Settings)
RECORDS_KEY: web.AppKey[deque[Json]] = web.AppKey("records")


class ApiError(Exception):
    """Raised by handlers; rendered as an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _error_type(status)


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        404: "not_found_error",
        405: "method_not_allowed_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, err_type: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type or _error_type(status), "code": status}}
    return web.json_response(body, status=status)


# --- middlewares -----------------------------------------------------------------------------


@web.middleware
async def record_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Record before handling so failed, rejected and reset requests are visible to tests too.
    # Hook and health paths are skipped: otherwise polling them would evict the real traffic.
    if not request.path.startswith("/_demo/") and request.path != "/healthz":
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request.app[RECORDS_KEY].append(
            {"method": request.method, "path": request.path, "headers": headers}
        )
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Every failure, including the router's own 404/405, leaves as OpenAI-shaped JSON.
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.err_type)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = "route not found" if exc.status == 404 else exc.reason
        return error_response(exc.status, f"{message}: {request.method} {request.path}")
    except Exception:
        log.exception("unhandled error for %s %s", request.method, request.path)
        return error_response(500, "internal error in demo backend")


# --- request parsing -------------------------------------------------------------------------


def _model_for(request: web.Request) -> Model:
    models = request.app[SETTINGS_KEY].models
    if "ns" not in request.match_info:
        # unprefixed /v1/...: what a model server behind a prefix-stripping route sees
        return next(iter(models.values()))
    key = f"{request.match_info['ns']}/{request.match_info['name']}"
    model = models.get(key)
    if model is None:
        raise ApiError(404, f"model {key} not found")
    return model


def _usage_headers(request: web.Request, prompt: int, completion: int) -> dict[str, str]:
    """Usage as response headers too, as some servers and middlewares send it, when the request
    names a header prefix (``x-demo-usage-headers: x-usage-``). The header values are ten times
    the body's, so a test can tell which of the two a reader used."""
    prefix = request.headers.get("x-demo-usage-headers")
    if not prefix:
        return {}
    return {
        f"{prefix}prompt-tokens": str(prompt * 10),
        f"{prefix}completion-tokens": str(completion * 10),
        f"{prefix}total-tokens": str((prompt + completion) * 10),
    }


def _fail_hook(request: web.Request) -> web.StreamResponse | None:
    """Simulates upstream failures on demand (``x-demo-fail``); None means serve normally."""
    value = request.headers.get("x-demo-fail")
    if value is None:
        return None
    value = value.strip().lower()
    if value == "reset":
        transport = request.transport
        if transport is not None:
            # abort() (unlike close()) drops the socket at once, so the client sees a reset
            # with no response bytes, like a crashed upstream.
            transport.abort()
        # Never sent: aiohttp fails to write it to the aborted transport and drops it quietly.
        return web.Response(status=500)
    if value.isdigit() and 400 <= int(value) <= 599:
        raise ApiError(int(value), f"simulated upstream failure (x-demo-fail: {value})")
    raise ApiError(400, f"x-demo-fail must be 'reset' or a 4xx/5xx status, got {value!r}")


async def _json_body(request: web.Request) -> Json:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    # bool is an int subclass; JSON true must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(body: Json, *fields: str) -> int:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ApiError(400, f"'{field}' must be a positive integer")
        return min(int(value), MAX_TOKENS_CAP)
    return DEFAULT_MAX_TOKENS


def _stream_flags(body: Json) -> tuple[bool, bool]:
    """Returns (stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object")
    include_usage = options.get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean")
    return stream, include_usage


def _check_model_field(body: Json) -> None:
    # The model is picked by the URL prefix; clients may send "tiny" or "llm/tiny", so the body
    # field is only type-checked.
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string")


def _words(text: str) -> int:
    return len(text.split())


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object")
        if not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}].role must be a string")
        content = message.get("content")
        if isinstance(content, str):
            total += _words(content)
        elif isinstance(content, list):
            # OpenAI content parts; only text parts count, images etc. are ignored.
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise ApiError(400, f"messages[{i}].content[{j}] must be an object")
                if part.get("type") == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ApiError(400, f"messages[{i}].content[{j}].text must be a string")
                    total += _words(text)
        elif content is not None:
            raise ApiError(400, f"messages[{i}].content must be a string, array or null")
        total += CHAT_MESSAGE_OVERHEAD
    return max(total, 1)


def _input_token_counts(value: Any, field: str) -> list[int]:
    """Token counts per input for a prompt/input field: string, strings, ids or lists of ids."""
    if isinstance(value, str):
        return [max(_words(value), 1)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [max(_words(v), 1) for v in value]
        if all(_is_int(v) for v in value):
            return [len(value)]
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return [len(v) for v in value]
    raise ApiError(
        400, f"'{field}' must be a string, an array of strings, or (arrays of) token ids"
    )


# --- fake generation -------------------------------------------------------------------------


def _tokens(model: Model, count: int) -> list[str]:
    # The reply is the model name repeated, so a test can tell which model answered.
    return [model.name if i == 0 else f" {model.name}" for i in range(count)]


def _usage(prompt: int, completion: int, *, final_chunk: bool = False) -> Json:
    usage: Json = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if not final_chunk:
        # vLLM's non-streaming usage carries these null detail fields; its stream chunk does not.
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    # Map pairs of digest bytes to [-1, 1], rounded so the JSON stays short and stable.
    return [
        round(int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0, 6)
        for i in range(EMBEDDING_DIM)
    ]


def _sse(payload: Json | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(request: web.Request, events: AsyncIterator[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        async for event in events:
            # Each write goes straight to the transport, so every event is flushed as produced.
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:
        # Client went away mid-stream; nothing left to tell it.
        pass
    return response


async def _token_pause(request: web.Request) -> None:
    delay = request.app[SETTINGS_KEY].token_delay_s
    if delay > 0:
        await asyncio.sleep(delay)


# --- handlers --------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    model = _model_for(request)
    if (failed := _fail_hook(request)) is not None:
        return failed
    body = await _json_body(request)
    _check_model_field(body)
    prompt_tokens = _chat_prompt_tokens(body.get("messages"))
    completion_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    stream, include_usage = _stream_flags(body)
    tokens = _tokens(model, completion_tokens)
    base: Json = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
    }

    if not stream:
        return web.json_response(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
                "usage": _usage(prompt_tokens, completion_tokens),
            },
            headers=_usage_headers(request, prompt_tokens, completion_tokens),
        )

    chunk_base = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: Json, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**chunk_base, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        for token in tokens:
            await _token_pause(request)
            yield chunk({"content": token})
        yield chunk({}, "length")
        if include_usage:
            usage = _usage(prompt_tokens, completion_tokens, final_chunk=True)
            yield _sse({**chunk_base, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    return await _stream(request, events())


async def completions(request: web.Request) -> web.StreamResponse:
    model = _model_for(request)
    if (failed := _fail_hook(request)) is not None:
        return failed
    body = await _json_body(request)
    _check_model_field(body)
    prompt_counts = _input_token_counts(body.get("prompt"), "prompt")
    max_tokens = _max_tokens(body, "max_tokens")
    stream, include_usage = _stream_flags(body)
    tokens = _tokens(model, max_tokens)
    prompt_tokens = sum(prompt_counts)
    # One choice per prompt, as vLLM does for batched prompts.
    completion_tokens = max_tokens * len(prompt_counts)
    base: Json = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
    }

    def choice(index: int, text: str, finish_reason: str | None) -> Json:
        return {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }

    if not stream:
        text = "".join(tokens)
        return web.json_response(
            {
                **base,
                "choices": [choice(i, text, "length") for i in range(len(prompt_counts))],
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )

    async def events() -> AsyncIterator[bytes]:
        for token in tokens:
            await _token_pause(request)
            for i in range(len(prompt_counts)):
                yield _sse({**base, "choices": [choice(i, token, None)]})
        for i in range(len(prompt_counts)):
            yield _sse({**base, "choices": [choice(i, "", "length")]})
        if include_usage:
            usage = _usage(prompt_tokens, completion_tokens, final_chunk=True)
            yield _sse({**base, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    return await _stream(request, events())


async def embeddings(request: web.Request) -> web.StreamResponse:
    model = _model_for(request)
    if (failed := _fail_hook(request)) is not None:
        return failed
    body = await _json_body(request)
    _check_model_field(body)
    raw: Any = body.get("input")
    prompt_tokens = sum(_input_token_counts(raw, "input"))
    return web.json_response(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model.name,
            "data": [
                {"index": i, "object": "embedding", "embedding": _embedding(text)}
                for i, text in enumerate(_embedding_texts(raw))
            ],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def _embedding_texts(raw: str | list[Any]) -> list[str]:
    """One text per input; token-id inputs are hashed via their JSON text to stay deterministic."""
    if isinstance(raw, str):
        return [raw]
    if all(isinstance(v, str) for v in raw):
        return list(raw)
    if all(_is_int(v) for v in raw):
        return [json.dumps(raw)]
    return [json.dumps(v) for v in raw]


async def model_list(request: web.Request) -> web.StreamResponse:
    # Under a model prefix list just that model, as a single vLLM would; at the root list all.
    if "ns" in request.match_info:
        return _models_response([_model_for(request)])
    return _models_response(list(request.app[SETTINGS_KEY].models.values()))


def _models_response(models: list[Model]) -> web.Response:
    return web.json_response({"object": "list", "data": [m.card() for m in models]})


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def get_records(request: web.Request) -> web.StreamResponse:
    records = request.app[RECORDS_KEY]
    return web.json_response(list(records))


async def clear_records(request: web.Request) -> web.StreamResponse:
    request.app[RECORDS_KEY].clear()
    return web.json_response([])


# --- app and entry point ---------------------------------------------------------------------


def build_app(models: Sequence[tuple[str, str]], *, token_delay_ms: float = 0.0) -> web.Application:
    """Builds the demo app serving ``models`` as (namespace, name) pairs."""
    created = int(time.time())
    served: dict[str, Model] = {}
    for namespace, name in models:
        if not namespace or not name or "/" in namespace or "/" in name:
            raise ValueError(f"invalid model {namespace!r}/{name!r}")
        model = Model(namespace, name, created)
        served[model.key] = model
    if not served:
        raise ValueError("at least one model is required")

    app = web.Application(middlewares=[record_middleware, error_middleware])
    app[SETTINGS_KEY] = Settings(models=served, token_delay_s=max(token_delay_ms, 0.0) / 1000)
    app[RECORDS_KEY] = deque(maxlen=RECORDED_REQUESTS)
    # One dynamic prefix for all models, so an unknown model gets a precise 404 message.
    prefix = "/{ns}/{name}/v1"
    app.router.add_post(f"{prefix}/chat/completions", chat_completions)
    app.router.add_post(f"{prefix}/completions", completions)
    app.router.add_post(f"{prefix}/embeddings", embeddings)
    app.router.add_get(f"{prefix}/models", model_list)
    # Without the prefix, as vLLM serves them (the gateway strips /<ns>/<name>): the first model.
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", model_list)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_demo/requests", get_records)
    app.router.add_delete("/_demo/requests", clear_records)
    return app


def parse_addr(addr: str) -> tuple[str, int]:
    """Parses ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def parse_model(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        # ArgumentTypeError so argparse shows this message rather than a generic one.
        raise argparse.ArgumentTypeError(f"model must be NAMESPACE/NAME, got {value!r}")
    return namespace, name


async def run(
    addr: str,
    models: Sequence[tuple[str, str]],
    *,
    token_delay_ms: float = 0.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until ``stop`` is set or the task is cancelled (forever if ``stop`` is None)."""
    host, port = parse_addr(addr)
    # No access log: the demo stack's logs should show the gateway's lines, not ours.
    runner = web.AppRunner(build_app(models, token_delay_ms=token_delay_ms), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        # Report the bound port, which differs from the requested one for port 0.
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info("demo backend listening on http://%s:%d", shown, bound_port)
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(
        args.addr, args.model or list(DEFAULT_MODELS), token_delay_ms=args.token_delay_ms, stop=stop
    )
    log.info("demo backend stopped")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m maas_demo.backend",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--addr", default="127.0.0.1:8000", help="HOST:PORT to listen on")
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model,
        help="NAMESPACE/NAME to serve; repeatable (default: llm/tiny)",
    )
    parser.add_argument(
        "--token-delay-ms", type=float, default=0.0, help="pause before each streamed token"
    )
    args = parser.parse_args(argv)
    try:
        parse_addr(args.addr)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
