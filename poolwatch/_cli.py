"""The ``poolwatch`` command: ``poolwatch demo`` and ``poolwatch top URL``.

Exit codes: 0 ok, 1 the command could not do its job (the message on stderr says why),
2 usage error (argparse's convention), 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from ._version import __version__

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Connection-pool observability for httpx / httpx2 clients.

  poolwatch demo            watch a too-small pool struggle against a fake LLM API
  poolwatch top URL         live view of the pools behind a poolwatch /metrics endpoint
"""

_DEMO_DESCRIPTION = """\
Start a fake LLM API (chat completions, streamed and not, realistic latency) on 127.0.0.1,
drive it through an instrumented httpx.AsyncClient whose pool is deliberately too small, show
the pool live, serve /metrics while it runs, and end with a report that says what it saw and
what to change. A couple of streamed responses are leaked on purpose, to show how poolwatch
catches them.
"""

_DEMO_EPILOG = """\
examples:
  poolwatch demo
  poolwatch demo --concurrency 64 --max-connections 16 --duration 60
  poolwatch demo --http2 --metrics-port 0
  poolwatch demo --json --duration 5 | jq .queue_wait_p99_s

exit codes: 0 ok, 1 could not run (e.g. the metrics port is taken), 2 usage, 130 Ctrl-C
(the report so far is still printed).
"""

_TOP_DESCRIPTION = """\
A live view of the pools behind any /metrics endpoint that poolwatch exports: utilization,
active/idle connections, waiting requests, the oldest wait, requests/s, reuse ratio,
PoolTimeouts/s and leaked responses, one row per pool (and per instance, when the page has an
`instance` label). Rates are computed between two scrapes.
"""

_TOP_EPILOG = """\
examples:
  poolwatch top http://127.0.0.1:9464/metrics
  poolwatch top 127.0.0.1:9464 --interval 5
  poolwatch top http://127.0.0.1:9464/metrics --once

exit codes: 0 ok, 1 the URL is unreachable or has no poolwatch metrics, 2 usage, 130 Ctrl-C.
"""


def _number(
    kind: Callable[[str], float],
    minimum: float,
    *,
    strict: bool = False,
    maximum: float | None = None,
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value <= minimum if strict else value < minimum:
            bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwatch",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="watch a too-small pool against an embedded fake LLM API, then read the report",
        description=_DEMO_DESCRIPTION,
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--duration",
        type=_number(float, 0.0, strict=True),
        default=20.0,
        metavar="SECONDS",
        help="how long to drive traffic (default: %(default)g)",
    )
    demo.add_argument(
        "--concurrency",
        type=_number(int, 1),
        default=24,
        metavar="N",
        help="tasks calling the API at once (default: %(default)s)",
    )
    demo.add_argument(
        "--max-connections",
        type=_number(int, 1),
        default=8,
        metavar="N",
        help="the pool's max_connections, deliberately below --concurrency (default: %(default)s)",
    )
    demo.add_argument(
        "--pool-timeout",
        type=_number(float, 0.0, strict=True),
        default=1.0,
        metavar="SECONDS",
        help="how long a request waits for a connection before PoolTimeout (default: %(default)g)",
    )
    demo.add_argument(
        "--http2",
        action="store_true",
        help="speak HTTP/2 (h2c, prior knowledge); the server then allows --max-connections "
        "concurrent streams per connection",
    )
    demo.add_argument(
        "--metrics-port",
        type=_number(int, 0, maximum=65535),
        default=9464,
        metavar="N",
        help="serve /metrics on 127.0.0.1:N while the demo runs; 0 for none (default: %(default)s)",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the final report as one JSON object on stdout, and nothing else there",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for the fake API's jitter and the traffic mix (default: random; the report "
        "names it)",
    )
    demo.add_argument(
        "--client",
        choices=("auto", "httpx", "httpx2"),
        default="auto",
        help="which library drives the traffic (default: httpx if installed, else httpx2)",
    )
    demo.set_defaults(run=_run_demo)

    top = commands.add_parser(
        "top",
        help="live view of the pools behind a poolwatch /metrics endpoint",
        description=_TOP_DESCRIPTION,
        epilog=_TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "url",
        metavar="URL",
        help="the /metrics page (http://host:port/metrics; `host:port` alone means that)",
    )
    top.add_argument(
        "--interval",
        type=_number(float, 0.0, strict=True),
        default=2.0,
        metavar="SECONDS",
        help="seconds between scrapes; rates are computed over it (default: %(default)g)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="scrape twice, --interval apart, print one table and exit",
    )
    top.add_argument(
        "--timeout",
        type=_number(float, 0.0, strict=True),
        default=5.0,
        metavar="SECONDS",
        help="how long one scrape may take (default: %(default)g)",
    )
    top.set_defaults(run=_run_top)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoError, DemoOptions, run_demo  # noqa: PLC0415

    options = DemoOptions(
        duration=args.duration,
        concurrency=args.concurrency,
        max_connections=args.max_connections,
        http2=args.http2,
        metrics_port=args.metrics_port,
        json=args.json,
        seed=args.seed,
        pool_timeout=args.pool_timeout,
        client=args.client,
    )
    try:
        _report, code = run_demo(options)
    except DemoError as exc:
        return _fail("demo", str(exc))
    return code


def _run_top(args: argparse.Namespace) -> int:
    from ._top import TopError, run_top  # noqa: PLC0415

    try:
        return run_top(args.url, interval=args.interval, once=args.once, timeout=args.timeout)
    except TopError as exc:
        return _fail("top", str(exc))


def _fail(command: str, message: str) -> int:
    print(f"poolwatch {command}: error: {message}", file=sys.stderr)
    return EXIT_RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``poolwatch`` with ``argv`` (``sys.argv[1:]`` when ``None``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("poolwatch: error: a command is required: demo or top", file=sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code
