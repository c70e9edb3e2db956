"""poolwatch's own loopback HTTP server: HTTP/1.1 and HTTP/2, exact counters, chosen failures.

Used by the test suite, ``poolwatch demo`` (the fake LLM API) and chaos experiments. It
depends only on the standard library and ``h2``.

    from poolwatch._loopback import LoopbackServer, default_routes

    with LoopbackServer(default_routes()) as server:
        httpx.get(f"{server.url}/ok")
        assert server.stats.accepted_connections == 1
"""

from ._llm import llm_routes
from ._routes import default_routes
from ._server import (
    Handler,
    Headers,
    HeadersLike,
    LoopbackRequest,
    LoopbackServer,
    LoopbackStats,
    Responder,
)

__all__ = [
    "Handler",
    "Headers",
    "HeadersLike",
    "LoopbackRequest",
    "LoopbackServer",
    "LoopbackStats",
    "Responder",
    "default_routes",
    "llm_routes",
]
