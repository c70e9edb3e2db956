"""The loopback server, as real httpx / httpx2 clients and the real LLM SDKs see it."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from types import ModuleType

import anthropic
import httpx
import httpx2
import openai
import pytest

from poolwatch._loopback import (
    LoopbackRequest,
    LoopbackServer,
    Responder,
    default_routes,
    llm_routes,
)

ServerFactory = Callable[..., LoopbackServer]
CLIENT_LIBS = [pytest.param(httpx, id="httpx"), pytest.param(httpx2, id="httpx2")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _no_server_noise(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in ("poolwatch.loopback", "asyncio")
    ]
    assert noisy == [], [r.getMessage() for r in noisy]


# --------------------------------------------------------------------------------------------
# HTTP/1.1: keep-alive and every default route
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", CLIENT_LIBS)
def test_five_sequential_requests_reuse_one_keep_alive_connection(
    loopback_server: LoopbackServer, lib: ModuleType
) -> None:
    with lib.Client() as client:
        for _ in range(5):
            response = client.get(f"{loopback_server.url}/ok")
            assert response.status_code == 200
            assert response.json() == {"ok": True, "path": "/ok"}
            assert response.http_version == "HTTP/1.1"
    stats = loopback_server.stats
    assert stats.accepted_connections == 1
    assert stats.h1_connections == 1
    assert stats.requests == 5
    assert stats.requests_by_path["/ok"] == 5
    loopback_server.wait_for(lambda s: s.open_connections == 0, timeout=2)


def test_delay_answers_after_the_requested_time(loopback_server: LoopbackServer) -> None:
    started = time.monotonic()
    response = httpx.get(f"{loopback_server.url}/delay?s=0.2")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 0.2 <= elapsed < 1.0
    assert response.json()["slept"] >= 0.2


def test_stream_flushes_each_chunk_as_it_is_written(loopback_server: LoopbackServer) -> None:
    arrivals: list[float] = []
    data = b""
    with (
        httpx.Client() as client,
        client.stream("GET", f"{loopback_server.url}/stream?chunks=3&delay=0.1&size=5") as r,
    ):
        for piece in r.iter_raw():
            arrivals.append(time.monotonic())
            data += piece
    assert data == b"aaaaabbbbbccccc"
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] >= 0.08
    assert arrivals[2] - arrivals[1] >= 0.08


def test_status_answers_with_the_requested_code(loopback_server: LoopbackServer) -> None:
    response = httpx.get(f"{loopback_server.url}/status?code=503")
    assert response.status_code == 503
    assert loopback_server.stats.responses_by_status[503] == 1


@pytest.mark.parametrize("route", ["/close", "/goaway"])
@pytest.mark.parametrize("lib", CLIENT_LIBS)
def test_a_closing_route_makes_the_next_request_open_a_new_connection(
    loopback_server: LoopbackServer, lib: ModuleType, route: str
) -> None:
    with lib.Client() as client:
        assert client.get(f"{loopback_server.url}{route}").status_code == 200
        # The close reaches the client asynchronously; a client that reuses the connection
        # before it has seen the FIN gets a ReadError. Real servers have the same race.
        loopback_server.wait_for(lambda s: s.open_connections == 0, timeout=2)
        assert client.get(f"{loopback_server.url}/ok").status_code == 200
    assert loopback_server.stats.accepted_connections == 2


def test_close_advertises_keep_alive_before_closing(loopback_server: LoopbackServer) -> None:
    response = httpx.get(f"{loopback_server.url}/close")
    assert response.headers["connection"] == "keep-alive"


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ("/drop", "RemoteProtocolError"),
        ("/reset", "ReadError"),
        ("/short", "RemoteProtocolError"),
        ("/stall", "ReadTimeout"),
    ],
)
@pytest.mark.parametrize("lib", CLIENT_LIBS)
def test_a_misbehaving_route_raises_the_expected_client_error(
    loopback_server: LoopbackServer, lib: ModuleType, route: str, error: str
) -> None:
    with lib.Client(timeout=lib.Timeout(2.0, read=0.3)) as client:
        with pytest.raises(getattr(lib, error)):
            client.get(f"{loopback_server.url}{route}")
        # the server is unharmed: the same client carries on, on a fresh connection
        assert client.get(f"{loopback_server.url}/ok").status_code == 200
    assert loopback_server.stats.accepted_connections == 2
    loopback_server.wait_for(lambda s: s.open_connections == 0 and s.in_flight_requests == 0, 2)


def test_reset_sends_a_tcp_rst_after_half_the_body(loopback_server: LoopbackServer) -> None:
    received = b""

    def read_until_closed(sock: socket.socket) -> None:
        nonlocal received
        while chunk := sock.recv(65536):
            received += chunk

    with socket.create_connection(("127.0.0.1", loopback_server.port)) as sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nhost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"x" * 500)
    assert loopback_server.stats.resets_sent == 1


def test_stall_holds_the_handler_until_the_client_leaves(
    loopback_server: LoopbackServer,
) -> None:
    with socket.create_connection(("127.0.0.1", loopback_server.port)) as sock:
        sock.sendall(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        time.sleep(0.2)
        assert loopback_server.stats.in_flight_requests == 1
    loopback_server.wait_for(lambda s: s.in_flight_requests == 0 and s.client_disconnects == 1)


def test_echo_reports_the_method_path_query_headers_and_body(
    loopback_server: LoopbackServer,
) -> None:
    response = httpx.post(
        f"{loopback_server.url}/echo?a=1&b=two",
        content=b"hello",
        headers={"X-Custom": "Yes"},
    )
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo"
    assert echoed["query"] == {"a": "1", "b": "two"}
    assert ["x-custom", "Yes"] in echoed["headers"]
    assert echoed["body"] == "hello"
    assert echoed["http_version"] == "1.1"


def test_echo_reassembles_a_chunked_request_body(loopback_server: LoopbackServer) -> None:
    response = httpx.post(f"{loopback_server.url}/echo", content=iter([b"ab", b"", b"cd"]))
    echoed = response.json()
    assert ["transfer-encoding", "chunked"] in echoed["headers"]
    assert echoed["body"] == "abcd"


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    loopback_server: LoopbackServer,
) -> None:
    requests = b"".join(
        f"GET /echo?n={n} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for n in range(3)
    ) + (b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", loopback_server.port)) as sock:
        sock.sendall(requests)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 4
    positions = [received.index(f'"n": "{n}"'.encode()) for n in range(3)]
    assert positions == sorted(positions)
    assert received.rstrip().endswith(b'{"ok": true, "path": "/ok"}')
    assert loopback_server.stats.accepted_connections == 1


def test_an_unknown_path_is_a_404(loopback_server: LoopbackServer) -> None:
    assert httpx.get(f"{loopback_server.url}/nowhere").status_code == 404


def test_a_handler_that_raises_gives_a_500_and_a_log_record(
    loopback_server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: LoopbackRequest, response: Responder) -> None:
        raise RuntimeError("boom")

    server = loopback_server_factory({"/broken": broken})
    with caplog.at_level(logging.ERROR, logger="poolwatch.loopback"):
        assert httpx.get(f"{server.url}/broken").status_code == 500
    assert any("/broken" in r.getMessage() for r in caplog.records)


def test_a_handler_that_returns_without_ending_gets_its_response_finished(
    loopback_server_factory: ServerFactory,
) -> None:
    async def forgetful(request: LoopbackRequest, response: Responder) -> None:
        await response.start(201, [("content-type", "text/plain")])
        await response.send(b"partial ")
        await response.send(b"but complete")

    server = loopback_server_factory({"/forgetful": forgetful})
    with httpx.Client() as client:
        response = client.get(f"{server.url}/forgetful")
        assert (response.status_code, response.text) == (201, "partial but complete")
        assert client.get(f"{server.url}/forgetful").status_code == 201
    assert server.stats.accepted_connections == 1


def test_close_after_closes_each_http1_connection_after_n_responses(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(close_after=2)
    with httpx.Client() as client:
        for i in range(5):
            response = client.get(f"{server.url}/ok")
            assert response.status_code == 200
            assert "connection" not in response.headers  # keep-alive is what it advertises
            if i % 2 == 1:
                # The close races the next request on the same connection (a real keep-alive
                # race, "Server disconnected without sending a response"): let it land first.
                server.wait_for(lambda s: s.open_connections == 0, 2)
    assert server.stats.accepted_connections == 3


def test_a_client_leaving_mid_stream_does_not_disturb_the_server(
    loopback_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{loopback_server.url}/stream?chunks=200&delay=0.01&size=1000"
    with httpx.Client() as client, client.stream("GET", url) as response:
        next(response.iter_raw())
    # closing an unfinished response closes its connection
    loopback_server.wait_for(lambda s: s.in_flight_requests == 0 and s.open_connections == 0, 2)
    assert loopback_server.stats.client_disconnects == 1
    assert httpx.get(f"{loopback_server.url}/ok").status_code == 200
    _no_server_noise(caplog)


def test_stop_closes_every_connection_and_the_listener() -> None:
    server = LoopbackServer(default_routes()).start()
    client = httpx.Client()
    assert client.get(f"{server.url}/ok").status_code == 200
    assert server.stats.open_connections == 1
    server.stop()
    assert server.stats.open_connections == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/ok")
    client.close()


# --------------------------------------------------------------------------------------------
# HTTP/2
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("lib", CLIENT_LIBS)
async def test_http2_over_tls_multiplexes_20_concurrent_requests_on_one_connection(
    loopback_server_factory: ServerFactory,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    lib: ModuleType,
) -> None:
    server = loopback_server_factory(tls=server_ssl_context)
    assert server.url.startswith("https://localhost:")
    async with lib.AsyncClient(http2=True, verify=client_ssl_context) as client:
        responses = await asyncio.gather(
            *(client.get(f"{server.url}/delay?s=0.2") for _ in range(20))
        )
    assert {r.status_code for r in responses} == {200}
    assert {r.http_version for r in responses} == {"HTTP/2"}
    stats = server.stats
    assert stats.accepted_connections == 1
    assert stats.tls_handshakes == 1
    assert stats.h2_connections == 1
    assert stats.requests == 20
    assert stats.peak_concurrent_requests == 20


def test_tls_without_h2_in_alpn_speaks_http1(
    loopback_server_factory: ServerFactory,
    server_ssl_context_factory: Callable[..., ssl.SSLContext],
    client_ssl_context: ssl.SSLContext,
) -> None:
    server = loopback_server_factory(tls=server_ssl_context_factory(("http/1.1",)), http2=False)
    with httpx.Client(http2=True, verify=client_ssl_context) as client:
        response = client.get(f"{server.url}/echo")
    assert response.http_version == "HTTP/1.1"
    assert response.json()["http_version"] == "1.1"
    assert server.stats.h1_connections == server.stats.tls_handshakes == 1


@pytest.mark.parametrize("lib", CLIENT_LIBS)
def test_h2c_prior_knowledge_speaks_http2_over_plain_tcp(
    loopback_server: LoopbackServer, lib: ModuleType
) -> None:
    with lib.Client(http1=False, http2=True) as client:
        responses = [client.get(f"{loopback_server.url}/echo") for _ in range(3)]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert [r.json()["stream_id"] for r in responses] == [1, 3, 5]
    assert loopback_server.stats.accepted_connections == 1
    assert loopback_server.stats.h2_connections == 1


@pytest.mark.anyio
async def test_the_h2_stream_limit_caps_concurrent_requests_on_a_connection(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(h2_max_concurrent_streams=2)
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        responses = await asyncio.gather(
            *(client.get(f"{server.url}/delay?s=0.15") for _ in range(6))
        )
    assert {r.status_code for r in responses} == {200}
    assert server.stats.accepted_connections == 1
    assert server.stats.peak_concurrent_requests == 2


@pytest.mark.anyio
async def test_http2_flow_control_carries_bodies_larger_than_the_window(
    loopback_server: LoopbackServer,
) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, sixteen times the default window
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        echoed = await client.post(f"{loopback_server.url}/echo", content=big)
        streamed = await client.get(f"{loopback_server.url}/stream?chunks=4&size=262144")
    assert echoed.json()["body_length"] == len(big)
    assert echoed.json()["body_hex"] == big.hex()
    assert len(streamed.content) == 4 * 262144


@pytest.mark.parametrize("lib", CLIENT_LIBS)
def test_close_after_sends_goaway_and_the_client_moves_to_a_new_connection(
    loopback_server_factory: ServerFactory, lib: ModuleType
) -> None:
    server = loopback_server_factory(close_after=2)
    with lib.Client(http1=False, http2=True) as client:
        for _ in range(5):
            assert client.get(f"{server.url}/ok").status_code == 200
    assert server.stats.accepted_connections == 3
    assert server.stats.goaways_sent >= 2
    assert server.stats.requests == 5


def test_a_graceful_goaway_route_moves_the_client_to_a_new_connection(
    loopback_server: LoopbackServer,
) -> None:
    with httpx.Client(http1=False, http2=True) as client:
        assert client.get(f"{loopback_server.url}/goaway").status_code == 200
        assert client.get(f"{loopback_server.url}/ok").status_code == 200
    assert loopback_server.stats.goaways_sent == 1
    assert loopback_server.stats.accepted_connections == 2


@pytest.mark.anyio
async def test_an_immediate_goaway_fails_the_requests_in_flight_on_that_connection(
    loopback_server_factory: ServerFactory,
) -> None:
    async def goaway_now(request: LoopbackRequest, response: Responder) -> None:
        await asyncio.sleep(0.1)  # let the other request start too
        await response.goaway(graceful=False)
        await asyncio.sleep(0.1)
        await response.respond(200, b"too late")

    server = loopback_server_factory({**default_routes(), "/goaway-now": goaway_now})
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        results = await asyncio.gather(
            client.get(f"{server.url}/goaway-now"),
            client.get(f"{server.url}/delay?s=0.3"),
            return_exceptions=True,
        )
        assert all(isinstance(r, httpx.RemoteProtocolError) for r in results), results
        assert "ConnectionTerminated" in str(results[0])
        assert (await client.get(f"{server.url}/ok")).status_code == 200
    assert server.stats.accepted_connections == 2


@pytest.mark.anyio
async def test_rst_stream_fails_one_request_and_spares_its_neighbours(
    loopback_server: LoopbackServer,
) -> None:
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        slow = asyncio.ensure_future(client.get(f"{loopback_server.url}/delay?s=0.2"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.RemoteProtocolError, match="StreamReset"):
            await client.get(f"{loopback_server.url}/reset")
        assert (await slow).status_code == 200
    assert loopback_server.stats.accepted_connections == 1
    assert loopback_server.stats.resets_sent == 1


@pytest.mark.anyio
async def test_a_stall_over_http2_times_out_and_the_stream_is_released(
    loopback_server: LoopbackServer,
) -> None:
    timeout = httpx.Timeout(2.0, read=0.2)
    async with httpx.AsyncClient(http1=False, http2=True, timeout=timeout) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{loopback_server.url}/stall")
    loopback_server.wait_for(lambda s: s.in_flight_requests == 0 and s.open_connections == 0, 2)


# --------------------------------------------------------------------------------------------
# The fake LLM API, driven by the real SDKs
# --------------------------------------------------------------------------------------------

EXPECTED_TEXT = "Hello from the poolwatch loopback model. Every"
FAST_LLM = {"ttft": 0.02, "token_delay": 0.005, "seed": 7}
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.mark.anyio
async def test_the_openai_sdk_gets_a_chat_completion(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(llm_routes(**FAST_LLM))
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0
    ) as client:
        completion = await client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert completion.choices[0].message.content == EXPECTED_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-fake"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert server.stats.labels["openai.chat.completions.nonstream"] == 1


@pytest.mark.anyio
async def test_the_openai_sdk_streams_a_chat_completion_with_usage(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(llm_routes(**FAST_LLM))
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-fake",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert server.stats.labels["openai.chat.completions.stream"] == 1
    assert server.stats.requests_by_path["/v1/chat/completions"] == 1


@pytest.mark.anyio
async def test_the_openai_sdk_streams_over_http2_with_tls(
    loopback_server_factory: ServerFactory,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    server = loopback_server_factory(llm_routes(**FAST_LLM), tls=server_ssl_context)
    http_client = httpx2.AsyncClient(http2=True, verify=client_ssl_context)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, http_client=http_client
    ) as client:

        async def one() -> str:
            stream = await client.chat.completions.create(
                model="gpt-fake", messages=MESSAGES, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one() for _ in range(5)))
    assert texts == [EXPECTED_TEXT] * 5
    assert server.stats.h2_connections == server.stats.accepted_connections == 1
    assert server.stats.peak_concurrent_requests == 5


@pytest.mark.anyio
async def test_the_anthropic_sdk_gets_a_message(loopback_server_factory: ServerFactory) -> None:
    server = loopback_server_factory(llm_routes(**FAST_LLM))
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0) as client:
        message = await client.messages.create(
            model="claude-fake", max_tokens=16, messages=MESSAGES
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == EXPECTED_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 8
    assert server.stats.labels["anthropic.messages.nonstream"] == 1


@pytest.mark.anyio
async def test_the_anthropic_sdk_streams_a_message(loopback_server_factory: ServerFactory) -> None:
    server = loopback_server_factory(llm_routes(**FAST_LLM))
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0) as client:
        async with client.messages.stream(
            model="claude-fake", max_tokens=16, messages=MESSAGES
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        events = [
            event.type
            async for event in await client.messages.create(
                model="claude-fake", max_tokens=16, messages=MESSAGES, stream=True
            )
        ]
    assert text == EXPECTED_TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 8
    assert events == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert server.stats.labels["anthropic.messages.stream"] == 2


def test_the_fake_llm_waits_ttft_before_headers_and_token_delay_between_tokens(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(llm_routes(ttft=0.2, token_delay=0.05, jitter=0, tokens=5))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    token_times: list[float] = []
    started = time.monotonic()
    with (
        httpx.Client() as client,
        client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response,
    ):
        headers_at = time.monotonic() - started
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                token_times.append(time.monotonic() - started)
    assert response.headers["content-type"] == "text/event-stream"
    assert 0.2 <= headers_at < 0.6
    assert len(token_times) == 5
    assert token_times[-1] - token_times[0] >= 4 * 0.05 * 0.9


def test_the_fake_llm_answers_a_forced_status_in_the_apis_error_shape(
    loopback_server_factory: ServerFactory,
) -> None:
    server = loopback_server_factory(llm_routes(ttft=0, token_delay=0))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-loopback-status": "429"}
        )
    client.close()
