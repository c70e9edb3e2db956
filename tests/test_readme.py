"""The README's examples run as written (against the loopback fake LLM API)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import poolwatch
from poolwatch._loopback import LoopbackServer, llm_routes

README = Path(__file__).parent.parent / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    found = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert found, f"no python block after {heading!r}"
    return found.group(1)


def test_the_fastapi_quickstart_serves_requests_and_its_pool_on_metrics(
    loopback_server_factory: Callable[..., LoopbackServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    llm = loopback_server_factory(llm_routes(ttft=0.001, token_delay=0.0))
    monkeypatch.setenv("LLM_BASE_URL", llm.url)
    namespace: dict[str, object] = {}
    exec(python_block_after("**A FastAPI service**"), namespace)  # our own README's code
    with TestClient(namespace["app"]) as http:  # runs the lifespan
        for _ in range(3):
            answer = http.post("/ask", params={"question": "hi"})
            assert answer.status_code == 200
            assert answer.json()["role"] == "assistant"
        client = http.app.state.llm  # type: ignore[attr-defined]
        snap = poolwatch.snapshot(client)
        assert snap.name == "llm"
        assert snap.requests_total == 3 == llm.stats.requests
        page = http.get("/metrics/").text
    assert 'poolwatch_pool_requests_total{connection_reused="true",pool_name="llm"' in page
    assert 'poolwatch_pool_connection_max{pool_name="llm"} 50.0' in page
