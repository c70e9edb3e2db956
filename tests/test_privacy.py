"""No credential leaves the process through poolwatch: secrets go into userinfo, query strings
and headers of real requests (successes, failures, a PoolTimeout, a saturated pool), and then
every exported byte is searched for them: the Prometheus page, OTel metrics and spans
(attributes, events, resource), the OTLP payloads a real receiver got, and poolwatch's log
records. Plus ``redact_url``'s edge cases, one by one."""

from __future__ import annotations

import base64
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from otlp_receivers import GrpcOtlpReceiver, HttpOtlpReceiver
from prometheus_client import CollectorRegistry, generate_latest
from truth import wait_until

import poolwatch
import poolwatch.otel
import poolwatch.prometheus
from poolwatch import _api
from poolwatch._loopback import LoopbackRequest, LoopbackServer, Responder, default_routes
from poolwatch._redact import redact_url
from poolwatch._saturation import check_all

#: semconv ``url.full``: values redacted, keys matched case-sensitively.
SEMCONV_KEYS = (
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "Signature",
    "sig",
    "X-Goog-Signature",
)
#: Query parameters that carry API keys (matched case-insensitively).
API_KEY_PARAMS = ("key", "api_key", "apikey", "access_token", "token")

#: One distinctive secret per place a credential can hide (URL-safe, so they travel as is).
QUERY_SECRETS = {k: f"qSECRET{i:02d}zx9" for i, k in enumerate(SEMCONV_KEYS + API_KEY_PARAMS)}
USER = "uSECRETuser41"
PASSWORD = "hunter2SECRETpw42"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
AUTHORIZATION = "Bearer sk-SECRETbearer43"
X_API_KEY = "xSECRETapikey44"
COOKIE = "cSECRETcookie45"
SET_COOKIE = "scSECRETsetcookie46"
EXTRA_PARAM_SECRET = "eSECRETextra47"
PROXY_USER = "pSECRETproxyuser48"
PROXY_PASSWORD = "pSECRETproxypw49"
PROXY_BASIC = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
ALL_SECRETS = (
    *QUERY_SECRETS.values(),
    USER,
    PASSWORD,
    BASIC,
    AUTHORIZATION.split()[1],
    X_API_KEY,
    COOKIE,
    SET_COOKIE,
    EXTRA_PARAM_SECRET,
    PROXY_USER,
    PROXY_PASSWORD,
    PROXY_BASIC,
)

#: Registries stay referenced for the whole session: poolwatch.prometheus.enable() remembers
#: registries by id(), and a new registry that reuses a collected one's id would silently not
#: be enabled (test_a_new_private_registry_is_enabled_even_if_it_reuses_a_collected_ones_id).
_REGISTRIES: list[CollectorRegistry] = []


@pytest.fixture(autouse=True)
def _forget_this_tests_exporters() -> Iterator[None]:
    """Restore ``poolwatch.otel``'s process-wide exporter list after each test: every
    exporter would otherwise stay subscribed to every later client (see test_otel.py)."""
    enabled = list(poolwatch.otel._enabled)
    listeners = list(_api._listeners)
    yield
    with poolwatch.otel._lock:
        poolwatch.otel._enabled[:] = enabled
    with _api._lock:
        _api._listeners[:] = listeners


async def set_cookie(request: LoopbackRequest, response: Responder) -> None:
    """200 with a session cookie in ``set-cookie``."""
    await response.respond_json(
        {"ok": True}, headers=[("set-cookie", f"sid={SET_COOKIE}; Path=/; HttpOnly")]
    )


@dataclass
class Exports:
    """Everything poolwatch can export, wired to one test's own sinks."""

    registry: CollectorRegistry
    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    grpc: GrpcOtlpReceiver
    http: HttpOtlpReceiver

    def flush(self) -> None:
        assert self.tracer_provider.force_flush(5_000)
        assert self.meter_provider.force_flush(5_000)

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest.fixture
def exports() -> Iterator[Exports]:
    registry = CollectorRegistry()
    _REGISTRIES.append(registry)
    poolwatch.prometheus.enable(registry)
    with GrpcOtlpReceiver() as grpc_rx, HttpOtlpReceiver() as http_rx:
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(
            metric_readers=[
                reader,
                PeriodicExportingMetricReader(
                    GrpcMetricExporter(endpoint=grpc_rx.endpoint, insecure=True, timeout=2),
                    export_interval_millis=600_000,
                ),
                PeriodicExportingMetricReader(
                    HttpMetricExporter(endpoint=http_rx.metrics_endpoint, timeout=2),
                    export_interval_millis=600_000,
                ),
            ]
        )
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                GrpcSpanExporter(endpoint=grpc_rx.endpoint, insecure=True, timeout=2),
                schedule_delay_millis=600_000,
            )
        )
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                HttpSpanExporter(endpoint=http_rx.traces_endpoint, timeout=2),
                schedule_delay_millis=600_000,
            )
        )
        poolwatch.otel.enable(
            meter_provider,
            tracer_provider,
            request_headers=["x-request-id"],
            sensitive_query_parameters=["X-Custom-Secret"],
        )
        try:
            yield Exports(
                registry, meter_provider, tracer_provider, reader, spans, grpc_rx, http_rx
            )
        finally:  # while the receivers still answer: a dead endpoint blocks for seconds
            tracer_provider.shutdown()
            meter_provider.shutdown()


def secret_forms(secret: str) -> set[str]:
    """A secret as it could appear once exported: as is, percent-encoded, or escaped."""
    return {secret, quote(secret, safe=""), secret.encode("unicode_escape").decode()}


def assert_no_secret_in(name: str, corpus: str | bytes) -> None:
    text = corpus.decode("latin-1") if isinstance(corpus, bytes) else corpus
    found = sorted(s for s in ALL_SECRETS if any(f in text for f in secret_forms(s)))
    assert found == [], f"{name} carries credentials: {found}"


def test_no_exported_byte_carries_a_credential(
    hx: Any,
    exports: Exports,
    loopback_server_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolwatch")
    routes = default_routes()
    routes["/set-cookie"] = set_cookie
    server: LoopbackServer = loopback_server_factory(routes)
    host = server.url.removeprefix("http://")
    query = "&".join(f"{k}={v}" for k, v in QUERY_SECRETS.items())
    query += f"&model=gpt-fake&X-Custom-Secret={EXTRA_PARAM_SECRET}"
    credential_headers = {
        "authorization": AUTHORIZATION,
        "x-api-key": X_API_KEY,
        "cookie": f"session={COOKIE}",
        "x-request-id": "req-7",
    }
    proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{host}"
    with (
        hx.Client(limits=hx.Limits(max_connections=1), timeout=5.0) as client,
        hx.Client(proxy=proxy) as proxied,
    ):
        poolwatch.instrument(client, name="privacy")
        pool = poolwatch.snapshot(client).name
        poolwatch.instrument(proxied, name="privacy-proxied")

        # A proxy with credentials (the loopback server answers absolute-form targets itself).
        echoed = proxied.get(f"{server.url}/echo?{query}").json()
        assert ["proxy-authorization", f"Basic {PROXY_BASIC}"] in echoed["headers"]

        # Userinfo: httpx turns it into an Authorization: Basic header.
        echoed = client.get(f"http://{USER}:{PASSWORD}@{host}/echo?{query}").json()
        assert ["authorization", f"Basic {BASIC}"] in echoed["headers"]
        # Query and credential headers; the server saw every one of them.
        echoed = client.get(f"{server.url}/echo?{query}", headers=credential_headers).json()
        assert echoed["query"]["sig"] == QUERY_SECRETS["sig"]
        assert ["x-api-key", X_API_KEY] in echoed["headers"]
        # A response cookie, which the client then sends back on every request.
        response = client.get(f"{server.url}/set-cookie?token={QUERY_SECRETS['token']}")
        assert SET_COOKIE in response.headers["set-cookie"]
        assert client.cookies["sid"] == SET_COOKIE
        # A failing request, an error status, and a stream closed early.
        with pytest.raises(hx.RemoteProtocolError):
            client.get(f"{server.url}/drop?{query}", headers=credential_headers)
        assert client.get(f"{server.url}/status?code=503&{query}").status_code == 503
        with client.stream("GET", f"{server.url}/stream?chunks=3&{query}") as streamed:
            next(streamed.iter_raw())
        # A saturated pool: a warning in the log, and a PoolTimeout.
        holder = threading.Thread(
            target=client.get,
            args=(f"{server.url}/delay?s=0.3&{query}",),
            kwargs={"headers": credential_headers},
        )
        holder.start()
        wait_until(lambda: server.stats.in_flight_requests == 1, what="the pool is full")
        with pytest.raises(hx.PoolTimeout):
            client.get(
                f"{server.url}/ok?{query}",
                headers=credential_headers,
                timeout=hx.Timeout(5.0, pool=0.05),
            )
        check_all()
        holder.join()
        # Read while the client is open: a closed client's pools leave the exports.
        prometheus_page = generate_latest(exports.registry)
        exports.flush()
    exports.flush()  # again, with the lifetimes of the connections the close ended
    exports.grpc.wait_for(lambda r: r.metrics() and len(r.spans()) >= 9)
    exports.http.wait_for(lambda r: r.metrics() and len(r.spans()) >= 9)

    metrics_data = exports.reader.get_metrics_data()
    assert metrics_data is not None
    in_memory_metrics = metrics_data.to_json()
    spans = exports.finished_spans()
    in_memory_spans = "\n".join(span.to_json() for span in spans)
    otlp = {
        "OTLP/gRPC payloads": exports.grpc.all_bytes() + repr(exports.grpc.headers).encode(),
        "OTLP/HTTP payloads": exports.http.all_bytes() + repr(exports.http.headers).encode(),
    }
    records = [r for r in caplog.records if r.name.startswith("poolwatch")]
    log_text = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records
    )

    assert_no_secret_in("the Prometheus page", prometheus_page)
    assert_no_secret_in("the OTel metrics", in_memory_metrics)
    assert_no_secret_in("the OTel spans (attributes, events, resource)", in_memory_spans)
    for name, payloads in otlp.items():
        assert_no_secret_in(name, payloads)
    assert_no_secret_in("the poolwatch log", log_text)

    # The search is only worth something if each sink really got this test's figures.
    assert f'pool_name="{pool}"'.encode() in prometheus_page
    assert pool in in_memory_metrics
    assert "REDACTED" in in_memory_spans
    assert "req-7" in in_memory_spans
    for payloads in otlp.values():
        assert pool.encode() in payloads
        assert b"REDACTED" in payloads
    warnings = [
        r for r in records if r.levelno == logging.WARNING and f"pool {pool!r}" in r.getMessage()
    ]
    assert warnings, "the saturated pool should have been reported in the log"

    # url.full keeps every key and says REDACTED; harmless parameters stay readable.
    client_spans = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert len(client_spans) == 9
    recorded_headers = []
    for span in client_spans:
        attributes = dict(span.attributes or {})
        url = str(attributes["url.full"])
        assert url.startswith(f"{server.url}/"), url  # no userinfo, not even redacted
        if "model=gpt-fake" in url:
            for key in QUERY_SECRETS:
                assert f"{key}=REDACTED" in url.split("?", 1)[1].split("&"), (key, url)
            assert "X-Custom-Secret=REDACTED" in url
        assert not [k for k in attributes if k.startswith("http.response.header.")]
        headers = {k: v for k, v in attributes.items() if k.startswith("http.request.header.")}
        if headers:
            recorded_headers.append(headers)
    # The one header the user named, on the four requests that sent it; no other header.
    assert recorded_headers == [{"http.request.header.x-request-id": ("req-7",)}] * 4
    assert sum("sig=REDACTED" in str(s.attributes["url.full"]) for s in client_spans) == 8  # type: ignore[index]


def test_a_client_without_an_httpcore_pool_gets_userinfo_redacted_in_url_full(hx: Any) -> None:
    # A custom transport receives httpx's own request, whose URL still holds the userinfo.
    def answer(request: Any) -> Any:
        return hx.Response(200, json={"ok": True})

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    poolwatch.otel.enable(MeterProvider(), tracer_provider)
    with hx.Client(transport=hx.MockTransport(answer)) as client:
        poolwatch.instrument(client, name="privacy-mock")
        client.get(f"http://{USER}:{PASSWORD}@api.example.test/v1/x?sig={QUERY_SECRETS['sig']}")
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["url.full"] == (
        "http://REDACTED:REDACTED@api.example.test/v1/x?sig=REDACTED"
    )
    assert_no_secret_in("the span", span.to_json())


@pytest.mark.parametrize(
    "header",
    ["authorization", "Authorization", "x-api-key", "cookie", "set-cookie", "proxy-authorization"],
)
def test_enable_refuses_to_record_a_credential_header(header: str) -> None:
    before = list(poolwatch.otel._enabled)
    with pytest.raises(ValueError, match="credential headers"):
        poolwatch.otel.enable(
            MeterProvider(), TracerProvider(), request_headers=["x-request-id", header]
        )
    assert poolwatch.otel._enabled == before


def test_a_new_private_registry_is_enabled_even_if_it_reuses_a_collected_ones_id() -> None:
    # Short-lived registries: one per test, per tenant, per pushed batch.
    with httpx.Client() as client:
        poolwatch.instrument(client, name="privacy-registry")
        name = poolwatch.snapshot(client).name
        exported = []
        gc.freeze()  # the collections below then only walk what the loop made: fast
        try:
            for _ in range(20):
                registry = CollectorRegistry()
                poolwatch.prometheus.enable(registry)
                exported.append(f'pool_name="{name}"'.encode() in generate_latest(registry))
                del registry
                gc.collect()
        finally:
            gc.unfreeze()
    assert all(exported), f"{exported.count(False)} of 20 registries never got the pools"


# --------------------------------------------------------------------------------------------
# redact_url, case by case
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("https://api.test/v1/models", "https://api.test/v1/models", id="no query"),
        pytest.param("https://api.test/v1?", "https://api.test/v1", id="empty query"),
        pytest.param("https://api.test/x?sig=", "https://api.test/x?sig=REDACTED", id="empty"),
        pytest.param("https://api.test/x?sig", "https://api.test/x?sig", id="no value at all"),
        pytest.param(
            "https://api.test/x?sig=a&model=m&sig=b",
            "https://api.test/x?sig=REDACTED&model=m&sig=REDACTED",
            id="repeated keys",
        ),
        pytest.param(
            "https://api.test/x?sig=a=b%3D", "https://api.test/x?sig=REDACTED", id="= in value"
        ),
        pytest.param(
            "https://s3.test/o?X-Amz-Signature=s&x-amz-signature=t&SIG=u",
            "https://s3.test/o?X-Amz-Signature=REDACTED&x-amz-signature=t&SIG=u",
            id="semconv keys are case-sensitive",
        ),
        pytest.param(
            "https://api.test/x?API_KEY=a&ApiKey=b&Token=c&KEY=d&Access_Token=e",
            "https://api.test/x?API_KEY=REDACTED&ApiKey=REDACTED&Token=REDACTED&KEY=REDACTED"
            "&Access_Token=REDACTED",
            id="API-key params are not",
        ),
        pytest.param(
            "https://api.test/x?monkey=1&keys=2&tokens=3",
            "https://api.test/x?monkey=1&keys=2&tokens=3",
            id="whole keys only",
        ),
        pytest.param(
            "https://api.test/x?a=1#access_token=secret",
            "https://api.test/x?a=1",
            id="fragment dropped",
        ),
        pytest.param(
            "https://user:pw@api.test:8443/x",
            "https://REDACTED:REDACTED@api.test:8443/x",
            id="userinfo",
        ),
        pytest.param("https://user@api.test/x", "https://REDACTED:REDACTED@api.test/x", id="user"),
        pytest.param(
            "https://u:p@ss@api.test/x", "https://REDACTED:REDACTED@api.test/x", id="@ in password"
        ),
        pytest.param(
            "http://u:p@[::1]:8080/x?key=k",
            "http://REDACTED:REDACTED@[::1]:8080/x?key=REDACTED",
            id="ipv6",
        ),
        pytest.param("http://[::1/x", "REDACTED", id="unparsable"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_extra_keys_extend_the_list_case_insensitively() -> None:
    url = "https://api.test/x?session=s&Session=t&X-Custom=u&model=m"
    assert redact_url(url) == url
    assert redact_url(url, ["session", "x-custom"]) == (
        "https://api.test/x?session=REDACTED&Session=REDACTED&X-Custom=REDACTED&model=m"
    )
