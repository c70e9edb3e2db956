"""A fake OpenAI / Anthropic API with realistic latency, for the demo and the SDK tests.

The JSON shapes are the ones the real ``openai`` (3.x) and ``anthropic`` (2.x) SDKs accept,
streamed (server-sent events) and not. Latency is the part that matters for a connection
pool: the time to first token holds a connection before any byte comes back, and every token
after it keeps the connection busy for ``token_delay`` more. Both are scaled by a random
factor in ``[1 - jitter, 1 + jitter]`` from ``random.Random(seed)``.

Each request bumps ``stats.labels``: ``openai.chat.completions`` / ``anthropic.messages``,
suffixed ``.stream`` or ``.nonstream``.

Test hooks, as request headers (the SDKs pass them with ``extra_headers``):
``x-loopback-status: 429`` answers with that status and the API's error JSON;
``x-loopback-tokens: N`` overrides the number of tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from typing import Any

from ._server import Handler, LoopbackRequest, Responder

__all__ = ["llm_routes"]

#: The text the fake model "generates", one token per item, cycled.
WORDS = (
    "Hello",
    " from",
    " the",
    " poolwatch",
    " loopback",
    " model",
    ".",
    " Every",
    " token",
    " holds",
    " a",
    " pooled",
    " connection",
    " a",
    " little",
    " longer",
    ".",
)

_SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


class _FakeModel:
    def __init__(
        self, *, ttft: float, token_delay: float, jitter: float, tokens: int, seed: int | None
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        self.ttft = ttft
        self.token_delay = token_delay
        self.jitter = jitter
        self.tokens = tokens
        # Only the server thread's event loop touches it, so no lock is needed.
        self.random = random.Random(seed)
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    async def pause(self, base: float) -> None:
        if base <= 0:
            return
        factor = self.random.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        await asyncio.sleep(base * factor)

    def pieces(self, request: LoopbackRequest, body: dict[str, Any]) -> list[str]:
        count = self.tokens
        override = request.headers.get("x-loopback-tokens")
        if override is not None and override.isdigit():
            count = max(1, int(override))
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int) and limit > 0:
                count = min(count, limit)
        return [WORDS[i % len(WORDS)] for i in range(count)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += len(part["text"].split())
    system = body.get("system")
    if isinstance(system, str):
        words += len(system.split())
    return max(1, words)


async def _read_body(request: LoopbackRequest, response: Responder) -> dict[str, Any] | None:
    if request.method != "POST":
        await response.respond_json(
            {"error": {"message": "method not allowed", "type": "invalid_request_error"}},
            status=405,
            headers=[("allow", "POST")],
        )
        return None
    try:
        body = request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        await response.respond_json(
            {"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}},
            status=400,
        )
        return None
    return body


def _forced_status(request: LoopbackRequest) -> int | None:
    value = request.headers.get("x-loopback-status")
    if value is not None and value.isdigit() and int(value) != 200:
        return int(value)
    return None


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _event(kind: str, data: Any) -> bytes:
    payload = json.dumps(data, separators=(",", ":")).encode()
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


def _openai_handler(model: _FakeModel) -> Handler:
    async def chat_completions(request: LoopbackRequest, response: Responder) -> None:
        body = await _read_body(request, response)
        if body is None:
            return
        streaming = bool(body.get("stream"))
        request.stats.count("openai.chat.completions." + ("stream" if streaming else "nonstream"))
        forced = _forced_status(request)
        if forced is not None:
            await model.pause(model.ttft)
            await response.respond_json(
                {
                    "error": {
                        "message": f"forced status {forced}",
                        "type": "loopback_forced_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=forced,
            )
            return
        name = str(body.get("model") or "gpt-fake")
        pieces = model.pieces(request, body)
        prompt = _prompt_tokens(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        ident = f"chatcmpl-fake{model.next_id()}"
        created = int(time.time())

        if not streaming:
            await model.pause(model.ttft)
            for _ in pieces[1:]:
                await model.pause(model.token_delay)
            await response.respond_json(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {
                                "role": "assistant",
                                "content": "".join(pieces),
                                "refusal": None,
                            },
                        }
                    ],
                    "usage": usage,
                }
            )
            return

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return _sse(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }
            )

        await model.pause(model.ttft)
        await response.start(200, _SSE_HEADERS)
        await response.send(chunk({"role": "assistant", "content": ""}))
        for i, piece in enumerate(pieces):
            if i:
                await model.pause(model.token_delay)
            await response.send(chunk({"content": piece}))
        await response.send(chunk({}, "stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await response.send(
                _sse(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        await response.send(b"data: [DONE]\n\n")
        await response.end()

    return chat_completions


def _anthropic_handler(model: _FakeModel) -> Handler:
    async def messages(request: LoopbackRequest, response: Responder) -> None:
        body = await _read_body(request, response)
        if body is None:
            return
        streaming = bool(body.get("stream"))
        request.stats.count("anthropic.messages." + ("stream" if streaming else "nonstream"))
        forced = _forced_status(request)
        if forced is not None:
            await model.pause(model.ttft)
            await response.respond_json(
                {
                    "type": "error",
                    "error": {"type": "api_error", "message": f"forced status {forced}"},
                },
                status=forced,
            )
            return
        name = str(body.get("model") or "claude-fake")
        pieces = model.pieces(request, body)
        prompt = _prompt_tokens(body)
        ident = f"msg_fake{model.next_id()}"

        def message(content: list[Any], stop_reason: str | None, output: int) -> dict[str, Any]:
            return {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": name,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": output},
            }

        if not streaming:
            await model.pause(model.ttft)
            for _ in pieces[1:]:
                await model.pause(model.token_delay)
            await response.respond_json(
                message([{"type": "text", "text": "".join(pieces)}], "end_turn", len(pieces))
            )
            return

        await model.pause(model.ttft)
        await response.start(200, _SSE_HEADERS)
        await response.send(
            _event("message_start", {"type": "message_start", "message": message([], None, 0)})
        )
        await response.send(
            _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        await response.send(_event("ping", {"type": "ping"}))
        for i, piece in enumerate(pieces):
            if i:
                await model.pause(model.token_delay)
            await response.send(
                _event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            )
        await response.send(
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        )
        await response.send(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(pieces)},
                },
            )
        )
        await response.send(_event("message_stop", {"type": "message_stop"}))
        await response.end()

    return messages


def llm_routes(
    *,
    ttft: float = 0.05,
    token_delay: float = 0.01,
    jitter: float = 0.3,
    tokens: int = 8,
    seed: int | None = None,
) -> dict[str, Handler]:
    """Routes for ``POST /v1/chat/completions`` (OpenAI) and ``POST /v1/messages`` (Anthropic).

    Point ``openai.AsyncOpenAI(base_url=f"{server.url}/v1")`` or
    ``anthropic.AsyncAnthropic(base_url=server.url)`` at a server built with them.
    """
    model = _FakeModel(ttft=ttft, token_delay=token_delay, jitter=jitter, tokens=tokens, seed=seed)
    return {
        "/v1/chat/completions": _openai_handler(model),
        "/v1/messages": _anthropic_handler(model),
    }
