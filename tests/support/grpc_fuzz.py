"""A raw-bytes and structure-aware fuzzer for the two gRPC servers (issue 21's first part).

Sends what a hostile client inside the cluster could send straight to the gRPC ports: random
bytes, truncated and garbled messages, and well-formed messages with absurd content (huge header
maps, megabyte values, strings that are not UTF-8, missing fields, thousands of descriptors,
extreme hits_addend). Every answer's status code is counted; `Figures` says what came back.
Seeded: a failing run is replayed with the same seed.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2

CHECK = "/envoy.service.auth.v3.Authorization/Check"
SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
KEYS = ("tier", "user", "model", "request_id", "charge", "outcome", "subscription",
        "token_limits", "billing_rate", "reserve_prompt", "reserve_completion", "key_id",
        "status", "streamed")  # fmt: skip
NOT_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1"


_ALPHABET = "abcdefghijklmnopqrstuvwxyz/._-:0123456789 \t\n\x00éü€😀"
_POOL_RNG = random.Random(0)
# strings drawn from a pool made once: building 20,000 random headers char by char per call
# would make the client, not the server, the bottleneck
_POOL = [
    "".join(_POOL_RNG.choice(_ALPHABET) for _ in range(_POOL_RNG.randint(0, 64)))
    for _ in range(4096)
]


def _text(rng: random.Random, longest: int = 64) -> str:
    return rng.choice(_POOL)[:longest]


def _huge(rng: random.Random) -> str:
    return rng.choice("ab/\x00é") * rng.choice((4096, 65536, 1 << 20))


def _value(rng: random.Random, huge: bool = True) -> str:
    roll = rng.random()
    if roll < 0.02 and huge:  # only in small messages: a message stays below ~16 MB
        return _huge(rng)
    if roll < 0.1:
        return str(rng.choice((0, -1, 2**31, 2**63, 10**30)))
    return _text(rng)


def _not_utf8(message: bytes, rng: random.Random) -> bytes:
    """The message with one of its string bytes replaced by bytes that are not UTF-8 (a
    protobuf string field must be UTF-8: the decoder must refuse, not crash)."""
    if not message:
        return NOT_UTF8
    at = rng.randrange(len(message))
    return message[:at] + NOT_UTF8 + message[at + 1 :]


def check_request(rng: random.Random) -> bytes:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    if rng.random() < 0.9:
        http.method = rng.choice(("POST", "GET", "DELETE", "", _text(rng, 8)))
    if rng.random() < 0.9:
        http.path = rng.choice(
            ("/llm/tiny/v1/chat/completions", "/v1/chat/completions", "/v1/models",
             "/v1/quota", "/" + _text(rng), _huge(rng) if rng.random() < 0.05 else "//")
        )  # fmt: skip
    count = rng.choice((0, 1, 3, 10, 100, 2000)) if rng.random() < 0.95 else 20_000
    for _ in range(count):
        http.headers[_text(rng, 16).lower()] = _value(rng, huge=count <= 10)
    if rng.random() < 0.5:
        http.headers["authorization"] = rng.choice(
            ("Bearer sk-demo-free", "Bearer " + _text(rng), "Basic x", "Bearer", _huge(rng),
             "Bearer sk-oai-" + _text(rng), "Bearer " + "a." * 40)
        )  # fmt: skip
    if rng.random() < 0.3:
        http.headers["x-maas-username"] = _text(rng)
    if rng.random() < 0.4:
        http.raw_body = rng.choice(
            (b"", b"{", b'{"model": 5}', b'{"model": "' + b"x" * 10_000 + b'"}', NOT_UTF8,
             rng.randbytes(rng.randint(1, 4096)), b"[" * 10_000)
        )  # fmt: skip
    if rng.random() < 0.2:
        request.attributes.context_extensions[_text(rng, 8)] = _value(rng)
    data = request.SerializeToString()
    return _not_utf8(data, rng) if rng.random() < 0.05 else data


def rate_limit_request(rng: random.Random) -> bytes:
    request = rls_pb2.RateLimitRequest()
    request.domain = rng.choice(("maas", "maas", "other", "", _text(rng, 8)))
    request.hits_addend = rng.choice((0, 1, 2**32 - 1, rng.randint(0, 1000)))
    count = rng.choice((0, 1, 2, 3, 10)) if rng.random() < 0.97 else rng.choice((1000, 5000))
    for _ in range(count):
        descriptor = request.descriptors.add()
        for _ in range(rng.choice((0, 1, 3, 6, 14, 50))):
            entry = descriptor.entries.add()
            entry.key = rng.choice(KEYS) if rng.random() < 0.8 else _text(rng, 12)
            entry.value = _value(rng, huge=count <= 3)
        if rng.random() < 0.5:
            descriptor.hits_addend.value = rng.choice((0, 1, 7, 2**32, 2**63, 2**64 - 1))
    data = request.SerializeToString()
    return _not_utf8(data, rng) if rng.random() < 0.05 else data


def garbage(rng: random.Random, valid: Callable[[random.Random], bytes]) -> bytes:
    """Random bytes, or a valid message truncated, bit-flipped or padded with noise."""
    roll = rng.random()
    if roll < 0.3:
        return rng.randbytes(rng.choice((0, 1, 5, 64, 1024, 65536)))
    message = valid(rng)
    if roll < 0.55 and message:
        return message[: rng.randrange(len(message))]
    if roll < 0.8 and message:
        flipped = bytearray(message)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return message + rng.randbytes(rng.randint(1, 64))


@dataclass
class Figures:
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)  # the first answer of each code

    def count(self, error: grpc.aio.AioRpcError) -> None:
        code = error.code().name
        self.codes[code] += 1
        self.details.setdefault(code, str(error.details())[:200])

    def line(self) -> str:
        codes = ", ".join(f"{code} {n}" for code, n in self.codes.most_common())
        return f"{self.calls} calls: {codes} (first answers: {self.details})"


async def fuzz(
    target: str, method: str, structured: Callable[[random.Random], bytes], calls: int,
    seed: int, concurrency: int = 16,
) -> Figures:  # fmt: skip
    """`calls` calls of `method` on `target`: half structured messages, half garbage."""
    rng = random.Random(seed)
    figures = Figures()
    # no client-side size limit: the server's own limit is what is under test
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no client-side encoding
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=concurrency * 2)

        async def send() -> None:
            while (payload := await queue.get()) is not None:
                try:
                    await call(payload, timeout=10)
                    figures.codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    figures.count(error)
                figures.calls += 1

        senders = [asyncio.create_task(send()) for _ in range(concurrency)]
        for _ in range(calls):
            await queue.put(structured(rng) if rng.random() < 0.5 else garbage(rng, structured))
        for _ in senders:
            await queue.put(None)
        await asyncio.gather(*senders)
    return figures


ACCESS_LOG = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
_NAMESPACES = ("envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit")


def access_log_message(rng: random.Random) -> bytes:
    """A batch of access log entries as Envoy streams them, with absurd values: codes, times
    out of any calendar's range, negative durations, odd metadata."""
    message = als_pb2.StreamAccessLogsMessage()
    if rng.random() < 0.5:
        message.identifier.log_name = _text(rng)
    for _ in range(rng.choice((0, 1, 10, 200))):
        entry = message.http_logs.log_entry.add()
        entry.request.path = _text(rng)
        entry.request.request_id = _text(rng)
        entry.request.request_method = rng.choice((0, 1, 3, 10))
        entry.response.response_code.value = rng.choice((0, 200, 429, 999_999, 2**32 - 1))
        namespace = rng.choice(_NAMESPACES) if rng.random() < 0.8 else _text(rng, 12)
        fields = entry.common_properties.metadata.filter_metadata[namespace].fields
        for _ in range(rng.randint(0, 6)):
            name = rng.choice(("reason", "user", "tier", "limit", "log_user", _text(rng, 8)))
            fields[name].string_value = _value(rng, huge=False)
        entry.common_properties.duration.seconds = rng.choice((0, -5, 2**40))
        entry.common_properties.start_time.seconds = rng.choice(
            (0, 1_796_000_000, -62_135_596_801, 253_402_300_805, 10**15)
        )
    data = message.SerializeToString()
    return _not_utf8(data, rng) if rng.random() < 0.05 else data


async def fuzz_stream(
    target: str, method: str, structured: Callable[[random.Random], bytes], streams: int,
    seed: int, concurrency: int = 8,
) -> Figures:  # fmt: skip
    """`streams` client streams of `method`, each of up to 10 messages (structured or garbage)."""
    rng = random.Random(seed)
    figures = Figures()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_unary(method)
        gate = asyncio.Semaphore(concurrency)

        async def one(payloads: list[bytes]) -> None:
            async def messages() -> AsyncIterator[bytes]:
                for payload in payloads:
                    yield payload

            async with gate:
                try:
                    await call(messages(), timeout=10)
                    figures.codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    figures.count(error)
                figures.calls += 1

        await asyncio.gather(
            *(
                one(
                    [
                        structured(rng) if rng.random() < 0.7 else garbage(rng, structured)
                        for _ in range(rng.randint(1, 10))
                    ]
                )
                for _ in range(streams)
            )
        )
    return figures
