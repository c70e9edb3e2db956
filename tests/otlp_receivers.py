"""Real OTLP endpoints in the test process: what the SDK's OTLP exporters send, as protos.

    with GrpcOtlpReceiver() as rx:            # or HttpOtlpReceiver()
        exporter = OTLPSpanExporter(endpoint=rx.endpoint, insecure=True, timeout=2)
        ...
        rx.wait_for(lambda r: r.spans())
        rx.spans(), rx.metrics(), rx.payloads

Both listen on 127.0.0.1 with a port the OS chose, answer every export with success, and
keep each ``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest`` as received, plus
the payload bytes (un-gzipped), so a test can search everything that left the process.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["GrpcOtlpReceiver", "HttpOtlpReceiver", "OtlpReceiver", "attributes_of"]


def attributes_of(item: Any) -> dict[str, Any]:
    """A proto's ``attributes`` (KeyValue list) as a plain dict of Python values."""
    return {kv.key: _any_value(kv.value) for kv in item.attributes}


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    if kind is None:
        return None
    return getattr(value, kind)


class OtlpReceiver:
    """What one receiver collected; the transports below fill it."""

    endpoint: str

    def __init__(self) -> None:
        self._cond = threading.Condition()  # an RLock: wait_for's predicate re-enters it
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        #: Every export's payload, serialized protobuf (un-gzipped), in arrival order.
        self.payloads: list[bytes] = []
        #: Request metadata / HTTP headers of every export, lower-cased names.
        self.headers: list[dict[str, str]] = []

    def _received(self, request: Any, payload: bytes, headers: dict[str, str]) -> None:
        with self._cond:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.trace_requests.append(request)
            else:
                self.metric_requests.append(request)
            self.payloads.append(payload)
            self.headers.append(headers)
            self._cond.notify_all()

    # -- reading ---------------------------------------------------------------------------

    def spans(self) -> list[trace_pb2.Span]:
        """Every span received so far, in arrival order."""
        with self._cond:
            return [
                span
                for request in self.trace_requests
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]

    def metrics(self) -> list[metrics_pb2.Metric]:
        """Every metric of every export received so far, in arrival order."""
        with self._cond:
            return [
                metric
                for request in self.metric_requests
                for resource_metrics in request.resource_metrics
                for scope_metrics in resource_metrics.scope_metrics
                for metric in scope_metrics.metrics
            ]

    def last_metrics(self) -> dict[str, metrics_pb2.Metric]:
        """The latest export's metrics by name (a flush exports each metric once)."""
        out: dict[str, metrics_pb2.Metric] = {}
        for metric in self.metrics():
            out[metric.name] = metric
        return out

    def all_bytes(self) -> bytes:
        with self._cond:
            return b"".join(self.payloads)

    def wait_for(self, predicate: Callable[[Self], Any], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` is truthy; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"OTLP receiver: timed out after {timeout} s waiting for {predicate}"
                        f" ({len(self.trace_requests)} trace and {len(self.metric_requests)}"
                        " metric exports so far)"
                    )
                self._cond.wait(min(left, 0.05))

    # -- context manager -------------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class GrpcOtlpReceiver(OtlpReceiver):
    """OTLP/gRPC: ``OTLP*Exporter(endpoint=rx.endpoint, insecure=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self._server: grpc.Server | None = None
        self.port = 0
        self.endpoint = ""

    def start(self) -> None:
        receiver = self

        def metadata(context: grpc.ServicerContext) -> dict[str, str]:
            return {k.lower(): str(v) for k, v in context.invocation_metadata()}

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
                receiver._received(request, request.SerializeToString(), metadata(context))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
                receiver._received(request, request.SerializeToString(), metadata(context))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.endpoint = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None


class HttpOtlpReceiver(OtlpReceiver):
    """OTLP/HTTP protobuf: ``OTLP*Exporter(endpoint=rx.traces_endpoint)`` (and metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.endpoint = ""

    @property
    def traces_endpoint(self) -> str:
        return f"{self.endpoint}/v1/traces"

    @property
    def metrics_endpoint(self) -> str:
        return f"{self.endpoint}/v1/metrics"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request: Any
                response: Any
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    response = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest()
                    response = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                request.ParseFromString(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver._received(request, body, headers)
                out = response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                del format, args  # keep pytest's output clean

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
