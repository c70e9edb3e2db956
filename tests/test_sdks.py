"""The real openai and anthropic SDKs: instrument() finds their HTTP client (httpx2 by
default, httpx when the user passes one), and every call is counted, streamed or not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

import poolwatch
from poolwatch._loopback import LoopbackServer, llm_routes

MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def llm(loopback_server_factory: Callable[..., LoopbackServer]) -> LoopbackServer:
    return loopback_server_factory(llm_routes(ttft=0.005, token_delay=0.001, seed=1))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def assert_counted(snap: poolwatch.PoolSnapshot, server: LoopbackServer, calls: int) -> None:
    assert snap.requests_total == calls == server.stats.requests
    assert snap.connections_created_total == server.stats.accepted_connections
    assert snap.active_requests == 0 == snap.pending_requests
    assert snap.errors == {}


@pytest.mark.anyio
async def test_async_openai_on_its_default_httpx2_client_is_counted_streamed_or_not(
    llm: LoopbackServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="sk-test", max_retries=0)
    assert poolwatch.instrument(client, name="openai") is client
    assert isinstance(client._client, httpx2.AsyncClient)
    done = await client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert done.choices[0].message.content
    stream = await client.chat.completions.create(model="gpt-fake", messages=MESSAGES, stream=True)
    text = "".join(
        [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    )
    assert text
    snap = poolwatch.snapshot(client)
    assert snap.name == "openai"
    assert_counted(snap, llm, 2)
    assert snap.reused_requests_total == 1
    await client.close()


@pytest.mark.anyio
async def test_async_openai_with_a_users_httpx_client_is_counted(llm: LoopbackServer) -> None:
    http_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=2))
    client = openai.AsyncOpenAI(
        base_url=f"{llm.url}/v1", api_key="sk-test", max_retries=0, http_client=http_client
    )
    poolwatch.instrument(client)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    snap = poolwatch.snapshot(http_client)  # the inner client is the same watch
    assert snap == poolwatch.snapshot(client)
    assert snap.max_connections == 2
    assert_counted(snap, llm, 3)
    await client.close()


def test_sync_openai_streams_are_counted(llm: LoopbackServer) -> None:
    with openai.OpenAI(base_url=f"{llm.url}/v1", api_key="sk-test", max_retries=0) as client:
        poolwatch.instrument(client)
        for _ in range(2):
            stream = client.chat.completions.create(
                model="gpt-fake", messages=MESSAGES, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert_counted(poolwatch.snapshot(client), llm, 2)


@pytest.mark.anyio
async def test_async_anthropic_messages_and_streams_are_counted(llm: LoopbackServer) -> None:
    client = anthropic.AsyncAnthropic(base_url=llm.url, api_key="sk-ant-test", max_retries=0)
    poolwatch.instrument(client, name="anthropic")
    message = await client.messages.create(model="claude-fake", max_tokens=16, messages=MESSAGES)
    assert message.content[0].text  # type: ignore[union-attr]
    async with client.messages.stream(model="claude-fake", max_tokens=16, messages=MESSAGES) as s:
        text = "".join([t async for t in s.text_stream])
    assert text
    assert_counted(poolwatch.snapshot(client), llm, 2)
    await client.close()


def test_sync_anthropic_is_counted(llm: LoopbackServer) -> None:
    with anthropic.Anthropic(base_url=llm.url, api_key="sk-ant-test", max_retries=0) as client:
        poolwatch.instrument(client)
        client.messages.create(model="claude-fake", max_tokens=16, messages=MESSAGES)
        with client.messages.stream(model="claude-fake", max_tokens=16, messages=MESSAGES) as s:
            assert "".join(s.text_stream)
        assert_counted(poolwatch.snapshot(client), llm, 2)


@pytest.mark.anyio
async def test_an_sdk_call_that_the_api_rejects_is_a_request_not_an_error(
    llm: LoopbackServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="sk-test", max_retries=0)
    poolwatch.instrument(client)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={"x-loopback-status": "429"}
        )
    snap = poolwatch.snapshot(client)
    assert snap.requests_total == 1
    assert snap.errors == {}  # an HTTP status is a response, not a transport error
    assert snap.active_requests == 0
    await client.close()
