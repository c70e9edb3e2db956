"""Shared fixtures. Add yours below; keep each block self-contained."""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import trustme

from poolwatch._loopback import Handler, LoopbackServer, default_routes

# --------------------------------------------------------------------------------------------
# Loopback server and TLS (poolwatch._loopback)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trustme_ca() -> trustme.CA:
    """A throwaway certificate authority for the whole session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl_context_factory(
    trustme_ca: trustme.CA,
) -> Callable[..., ssl.SSLContext]:
    """``make(alpn=("h2", "http/1.1"))``: a server context, cert for 127.0.0.1 and localhost."""
    cert = trustme_ca.issue_cert("127.0.0.1", "localhost")

    def make(alpn: tuple[str, ...] = ("h2", "http/1.1")) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        ctx.set_alpn_protocols(list(alpn))
        return ctx

    return make


@pytest.fixture(scope="session")
def server_ssl_context(server_ssl_context_factory: Callable[..., ssl.SSLContext]) -> ssl.SSLContext:
    """Server side TLS offering HTTP/2 and HTTP/1.1 through ALPN."""
    return server_ssl_context_factory(("h2", "http/1.1"))


@pytest.fixture
def client_ssl_context(trustme_ca: trustme.CA) -> ssl.SSLContext:
    """Client side TLS trusting ``trustme_ca``: pass it as ``verify=``.

    Function-scoped on purpose: httpcore sets the ALPN list on the context it is given.
    """
    ctx = ssl.create_default_context()
    trustme_ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def loopback_server_factory() -> Iterator[Callable[..., LoopbackServer]]:
    """``make(routes=None, **LoopbackServer kwargs)``: a started server, stopped after the test.

    ``routes`` defaults to ``default_routes()``.
    """
    servers: list[LoopbackServer] = []

    def make(routes: Mapping[str, Handler] | None = None, **kwargs: Any) -> LoopbackServer:
        server = LoopbackServer(default_routes() if routes is None else routes, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def loopback_server(loopback_server_factory: Callable[..., LoopbackServer]) -> LoopbackServer:
    """A plain-HTTP loopback server with the default routes (HTTP/1.1, and h2c on request)."""
    return loopback_server_factory()


# --------------------------------------------------------------------------------------------
# Client families and event loops: every scenario runs for httpx and httpx2
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["httpx", "httpx2"])
def hx(request: pytest.FixtureRequest) -> Any:
    """The client library under test: ``httpx`` (httpcore) or ``httpx2`` (httpcore2)."""
    return importlib.import_module(request.param)


@pytest.fixture(autouse=True)
def _reset_poolwatch_error_log() -> None:
    """Each test sees poolwatch's log-once sites fresh."""
    from poolwatch._safety import reset_reported_errors

    reset_reported_errors()


@pytest.fixture(autouse=True, scope="session")
def _park_the_saturation_sampler() -> None:
    """Tests drive ``check_all()`` with their own clock; the sampler thread would race them.

    ``test_saturation.py`` wakes the thread on purpose to show it runs.
    """
    import poolwatch._saturation

    poolwatch._saturation.SAMPLE_INTERVAL = 3600.0


# --------------------------------------------------------------------------------------------
# Hypothesis profiles (tests/test_randomized.py): "ci" by default, "dev" for long runs with
# `pytest --hypothesis-profile=dev`. Registered here, not in the test module, because the
# Hypothesis plugin loads the profile named on the command line before test modules import.
# --------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_HYPOTHESIS_COMMON: dict[str, Any] = {
    "deadline": None,  # a workload's duration is the server's and the network's, not ours
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": True,
}
# Reproducible examples, few enough to stay within about a minute; no shrinking, so that a
# failure is reported at once rather than after minutes of shrinking real I/O.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=100,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_HYPOTHESIS_COMMON,
)
# Fresh random examples each run, many more, shrunk to a minimal failing workload.
settings.register_profile("dev", max_examples=400, **_HYPOTHESIS_COMMON)
settings.load_profile("ci")
