"""``instrument()``, ``uninstrument()``, ``snapshot()``, and the process-wide list of watches."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from . import _httpcore
from ._core import PoolCore
from ._safety import logger, report_internal_error
from ._saturation import SaturationCallback, SaturationMonitor, sampler
from ._snapshot import PoolSnapshot
from ._watch import ClientWatch

_T = TypeVar("_T")

#: Client (and SDK object) -> its watch. Weak keys: a watch lives as long as its client.
_watches: weakref.WeakKeyDictionary[Any, ClientWatch] = weakref.WeakKeyDictionary()
_lock = threading.RLock()
#: Called with each new watch (exporters subscribe so that future pools appear too).
_listeners: list[Callable[[ClientWatch], None]] = []


def instrument(
    client: _T,
    *,
    name: str | None = None,
    max_origins: int = 50,
    saturation_threshold: float | None = 0.8,
    saturation_hysteresis: float = 0.1,
    warning_interval: float = 60.0,
    on_saturation: SaturationCallback | None = None,
) -> _T:
    """Watch the connection pools of ``client``, in place, and return it.

    Args:
        client: an ``httpx`` or ``httpx2`` ``Client`` / ``AsyncClient``, or an SDK client that
            holds one (``openai.AsyncOpenAI``, ``anthropic.Anthropic``, ...).
        name: labels the pool in every metric; by default the client's base URL host, else
            ``default``. Names are unique within the process: a taken one gets a suffix.
        max_origins: distinct (scheme, host, port) series kept per pool; requests to further
            origins are counted under ``server.address="_other"``.
        saturation_threshold: utilization at which the ``poolwatch`` logger warns that the
            pool saturates (``None``: never).
        saturation_hysteresis: how far below the threshold it must fall to count as
            recovered.
        warning_interval: seconds between repeated warnings while it stays saturated.
        on_saturation: called with a ``SaturationEvent`` at the same moments as the log.

    Calling it again on the same client does nothing. Every pool is watched: the default
    transport's, every ``mounts=`` transport's and every proxy's. A transport without an
    httpcore pool (a custom one) still gets request-level figures.

    Raises:
        TypeError: ``client`` is not something poolwatch can watch.
        ValueError: the client is closed, or an option is out of range.
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):  # type: ignore[redundant-expr]
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(max_origins, bool) or not isinstance(max_origins, int) or max_origins < 1:  # type: ignore[redundant-expr]
        raise ValueError(f"max_origins must be a positive int, got {max_origins!r}")
    if on_saturation is not None and not callable(on_saturation):
        raise TypeError(f"on_saturation must be callable, got {on_saturation!r}")
    monitor = None
    if saturation_threshold is not None:
        monitor = SaturationMonitor(
            threshold=saturation_threshold,
            hysteresis=saturation_hysteresis,
            interval=warning_interval,
        )
    http_client, flavour = _httpcore.find_client(client)
    with _lock:
        if _lookup(client) is not None:
            return client
        if getattr(http_client, "is_closed", False):
            raise ValueError("cannot instrument a closed client: it has no pool any more")
        existing = _watches.get(http_client)
        if existing is None:
            core = PoolCore(
                _unique_name(name or _default_name(http_client)),
                max_origins=max_origins,
                on_origin_overflow=_warn_origin_overflow,
            )
            existing = ClientWatch(
                http_client, flavour, core, saturation=monitor, on_saturation=on_saturation
            )
            _watches[http_client] = existing
            new = True
        else:
            new = False
        if client is not http_client:
            _watches[client] = existing
    if new:
        if monitor is not None:
            sampler.ensure_running()
        for listener in list(_listeners):
            try:
                listener(existing)
            except Exception as exc:
                report_internal_error("exporter subscription", exc)
    return client


def uninstrument(client: object) -> None:
    """Restore ``client`` as it was before ``instrument()``. Does nothing if it was not."""
    with _lock:
        watch = _lookup(client)
        if watch is None:
            return
        watch.detach()
        for key in [k for k, w in _watches.items() if w is watch]:
            del _watches[key]


def snapshot(client: object) -> PoolSnapshot:
    """The pools of an instrumented client at one instant.

    Cheap to call often: while the client is at rest (nothing in flight, nothing changed)
    it returns the same read-only object again.

    Raises:
        ValueError: the client was not instrumented.
    """
    watch = _lookup(client)
    if watch is None:
        raise ValueError(
            f"{type(client).__qualname__} is not instrumented: call poolwatch.instrument() first"
        )
    return watch.snapshot()


def watches() -> list[ClientWatch]:
    """The watches of clients still open, once each (exporters read this at scrape time).

    A closed client's pools leave the exports at once, without waiting for the garbage
    collector; ``snapshot()`` of it still works.
    """
    with _lock:
        seen: dict[int, ClientWatch] = {}
        for watch in _watches.values():
            if watch.alive:
                seen.setdefault(id(watch), watch)
        return list(seen.values())


def subscribe(listener: Callable[[ClientWatch], None]) -> None:
    """Call ``listener`` with every watch made from now on."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def _lookup(client: object) -> ClientWatch | None:
    try:
        watch = _watches.get(client)
    except TypeError:  # not weak-referenceable, so never instrumented
        return None
    if watch is not None:
        return watch
    try:
        http_client, _ = _httpcore.find_client(client)
    except TypeError:
        return None
    return _watches.get(http_client)


def _default_name(http_client: Any) -> str:
    try:
        host = http_client.base_url.host
    except Exception:
        host = ""
    return host or "default"


def _unique_name(wanted: str) -> str:
    taken = {w.name for w in watches()}
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted}-{n}" in taken:
        n += 1
    logger.info(
        "poolwatch: pool name %r is taken in this process; using %r", wanted, f"{wanted}-{n}"
    )
    return f"{wanted}-{n}"


def _warn_origin_overflow(core: PoolCore) -> None:
    logger.warning(
        "poolwatch: pool %r has called more than %d distinct origins; further ones are counted "
        'together as server.address="_other" (raise max_origins= to keep more series)',
        core.name,
        core.max_origins,
    )
