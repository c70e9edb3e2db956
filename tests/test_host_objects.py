"""poolwatch leaves httpcore's objects laid out as CPython made them.

On CPython 3.11 and 3.12 an object's attributes live in inline values until someone reads its
``__dict__``; from then on they live in a dictionary for good, and the interpreter stops
specialising the host's own attribute reads on that object (``self._state``, ``pool._requests``,
dozens per request). Reading ``pool.__dict__`` once at ``instrument()``, and each response
stream's per request, cost more CPU than all of poolwatch's bookkeeping (``bench/adaptive.py``
shows the sites). Patches are set, read and removed with ``setattr`` / ``getattr`` /
``delattr`` only; these tests hold every object a request passes through to that, across
requests, a held and a leaked response, a scrape and ``uninstrument()``, each scenario in an
interpreter of its own (``host_objects_worker.py`` says why).
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from host_objects_worker import attributes_in_a_dictionary

from poolwatch._loopback import LoopbackServer

pytestmark = pytest.mark.skipif(
    sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info < (3, 13),
    reason="inline attribute values that a __dict__ read turns into a dictionary: CPython "
    "3.11 and 3.12 (3.13 keeps them inline)",
)

WORKER = Path(__file__).with_name("host_objects_worker.py")


def run_scenario(scenario: str, hx: Any, url: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(WORKER), scenario, hx.__name__, url, *extra],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_the_detector_sees_a_dictionary_read(hx: Any, loopback_server: LoopbackServer) -> None:
    with hx.Client() as client:
        client.get(f"{loopback_server.url}/ok")
        (conn,) = client._transport._pool.connections
        assert not attributes_in_a_dictionary(conn._connection)
        assert conn._connection.__dict__  # what poolwatch must never do
        assert attributes_in_a_dictionary(conn._connection)


def test_an_async_http1_client_keeps_its_objects_laid_out_through_instrument_and_scrape(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    result = run_scenario("async-http1", hx, loopback_server.url)
    # The pool, 3 connections and their HTTP/1.1 ones, the held response's 2 httpcore streams.
    assert result["checked"] >= 9
    assert result["during"] == []
    assert result["after"] == []


def test_a_sync_http1_client_keeps_its_objects_laid_out(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    result = run_scenario("sync-http1", hx, loopback_server.url)
    assert result["checked"] >= 3 + 3 * 2
    assert result["during"] == []
    assert result["after"] == []


@pytest.mark.parametrize("scenario", ["late-http1", "late-async-http1"])
def test_http1_connections_keep_their_layout_when_poolwatch_comes_after_many_connections(
    hx: Any, loopback_server: LoopbackServer, scenario: str
) -> None:
    # Each new attribute name poolwatch gives a class must fit the layout its instances share;
    # past ~28 instances only one more fits. So the pooled connection takes one name (its
    # request call; the pool's close call tells poolwatch when it closes one), the HTTP/1.1
    # connection one (its release), httpcore's request one (the record it carries).
    result = run_scenario(scenario, hx, loopback_server.url)
    assert result["checked"] >= 2 + 4  # the kept connection, its HTTP/1.1 one, 4 requests
    assert result["closed"] == 1 == result["dropped"]  # the idle one the pool could not keep
    assert result["during"] == []
    assert result["after"] == []  # uninstrument() too


@pytest.mark.parametrize("scenario", ["async-http2", "late-async-http2"])
def test_an_http2_client_keeps_its_objects_laid_out(
    scenario: str,
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context: ssl.SSLContext,
    trustme_ca: trustme.CA,
    tmp_path: Path,
) -> None:
    server: LoopbackServer = loopback_server_factory(tls=server_ssl_context)
    ca_pem = tmp_path / "ca.pem"
    trustme_ca.cert_pem.write_to_path(str(ca_pem))
    result = run_scenario(scenario, hx, server.url, str(ca_pem))
    assert result["checked"] >= 3 + 3 * 2
    assert result["during"] == []
    assert result["after"] == []
