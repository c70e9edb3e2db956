"""The thin sync and async shells: where a request meets the pure core.

poolwatch sits at three places inside an httpcore pool, as instance attributes:

``pool.handle_(async_)request``
    the request enters (pending, active) and, on an exception, leaves.
``pool.create_connection`` and each connection's ``handle_(async_)request``
    the pool handed a connection to the request: the queue wait ends. A request that opens
    a new connection (or may be waiting for an HTTP/2 stream slot) gets a trace callback for
    that call only, which times connect and TLS; every other request runs without one.
``pool._close_connections``
    the pool closes connections it dropped (expired, surplus idle, closed by the server, the
    pool closed): one hook for sync and async pools alike, which hands back httpcore's own
    call. The connections themselves get no close hook where the pool has this call: a
    second attribute name on their class would cost every watched connection its inline
    layout in a process that made ~28 connections first (see ``_httpcore``), and the pool
    calls a method of each of its connections for every request.
the HTTP/1.1 connection's ``_response_closed``, else the response stream's ``aclose`` / ``close``
    the connection is released: the request is over. httpcore calls them on every ending,
    closed by the caller, fully read, or failed mid-body; a stream garbage-collected without
    them is a leaked response. HTTP/1.1 connections of httpcore's own are hooked once each
    (the request ends before the release, which runs as httpcore's own unless it is to close
    the connection); any other response stream (HTTP/2, a proxy's) gets its close wrapped,
    per request.

Each async function has a sync twin a few lines below it; the logic they share lives in the
core and in the plain helpers here, so the twins differ only by ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import weakref
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from . import _httpcore
from ._core import ConnRecord, OriginStats, PoolCore, RequestRecord
from ._httpcore import Flavour
from ._safety import report_internal_error

RequestHook = Callable[[RequestRecord], None]
StartHook = Callable[[RequestRecord, Any], None]
ConnectionClosedHook = Callable[[OriginStats, float], None]


class Hooks:
    """Exporter callbacks on a request's steps (spans, OTel histograms), set by exporters.

    ``on_start`` also gets the request (httpcore's, or httpx's for a pool-less transport).
    """

    __slots__ = ("on_connection_closed", "on_finish", "on_headers", "on_start")

    def __init__(self) -> None:
        self.on_start: StartHook | None = None
        self.on_headers: RequestHook | None = None
        self.on_finish: RequestHook | None = None
        self.on_connection_closed: ConnectionClosedHook | None = None


def _is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError) or (
        type(exc).__name__ == "Cancelled" and type(exc).__module__.startswith("trio")
    )


def error_type_of(exc: BaseException) -> str:
    """``error.type`` for an exception: its class name, or ``cancelled``.

    trio can wrap a cancellation in an exception group (a cancel during the TCP connect):
    a group of cancellations only is a cancellation too.
    """
    if _is_cancellation(exc):
        return "cancelled"
    if isinstance(exc, BaseExceptionGroup) and exc.split(_is_cancellation)[1] is None:
        return "cancelled"
    return type(exc).__name__


def _call_hook(hook: RequestHook | None, rec: RequestRecord, site: str) -> None:
    if hook is None:
        return
    try:
        hook(rec)
    except Exception as exc:
        report_internal_error(site, exc)


def _call_start_hook(hooks: Hooks, rec: RequestRecord, request: Any) -> None:
    hook = hooks.on_start
    if hook is None:
        return
    try:
        hook(rec, request)
    except Exception as exc:
        report_internal_error("request start hook", exc)


def _connection_gone(core: PoolCore, record: ConnRecord, key: int, hooks: Hooks) -> None:
    """Close the connection's record; tell the exporters its lifetime."""
    lifetime = core.connection_closed(record, key)
    hook = hooks.on_connection_closed
    if hook is not None and lifetime is not None:
        hook(record.origin, lifetime)


def _start(core: PoolCore, request: Any, hooks: Hooks) -> RequestRecord | None:
    """A request entered the pool: its record, which the request carries to the connection's
    request call (an attribute set and read costs a quarter of a context variable's
    set, get and reset; httpcore hands the pool's request object on as it is)."""
    try:
        url = request.url
        key = (url.scheme, url.host, url.port)
        origin = core.known_origins.get(key) or core.origin(key)
        request._poolwatch_record = None  # raises first if the request cannot carry it
        rec = request._poolwatch_record = core.start(origin)
    except Exception as exc:
        report_internal_error("request start", exc)
        return None
    if hooks.on_start is not None:
        _call_start_hook(hooks, rec, request)
    return rec


def _end(
    core: PoolCore,
    rec: RequestRecord,
    hooks: Hooks,
    error_type: str | None = None,
    pool_timeout: bool = False,
) -> None:
    """Finish the request in the core; tell the exporters, the first time only."""
    try:
        finished = core.finish(rec, error_type, pool_timeout)
    except Exception as exc:
        report_internal_error("request end bookkeeping", exc)
        return
    if finished:
        _call_hook(hooks.on_finish, rec, "request finish hook")


def _failed(
    core: PoolCore, rec: RequestRecord, exc: BaseException, flavour: Flavour, hooks: Hooks
) -> None:
    """An exception left the pool: the request is over, failed."""
    try:
        error_type = error_type_of(exc)
        pool_timeout = isinstance(exc, flavour.pool_timeouts)
    except Exception as err:
        report_internal_error("request failure bookkeeping", err)
        error_type, pool_timeout = type(exc).__name__, False
    _end(core, rec, hooks, error_type, pool_timeout)


# -- entering the pool --------------------------------------------------------------------


def async_pool_entry(
    core: PoolCore, pool: Any, previous: Any, flavour: Flavour, hooks: Hooks
) -> Callable[[Any], Awaitable[Any]]:
    """The replacement for ``pool.handle_async_request``."""
    cls = type(pool)

    async def handle_async_request(request: Any) -> Any:
        rec = _start(core, request, hooks)
        try:
            if previous is not None:
                response = await previous(request)
            else:
                response = await cls.handle_async_request(pool, request)
        except BaseException as exc:
            if rec is not None:
                _failed(core, rec, exc, flavour, hooks)
            raise
        if rec is not None and rec.pending:
            # No connection call of this watch saw it: the request object carried another
            # record there (sent through the pool twice at once, or through another watch's
            # entry too). End it now rather than leave it waiting for ever.
            _end(core, rec, hooks)
        return response

    return handle_async_request


def sync_pool_entry(
    core: PoolCore, pool: Any, previous: Any, flavour: Flavour, hooks: Hooks
) -> Callable[[Any], Any]:
    """The replacement for ``pool.handle_request``."""
    cls = type(pool)

    def handle_request(request: Any) -> Any:
        rec = _start(core, request, hooks)
        try:
            if previous is not None:
                response = previous(request)
            else:
                response = cls.handle_request(pool, request)
        except BaseException as exc:
            if rec is not None:
                _failed(core, rec, exc, flavour, hooks)
            raise
        if rec is not None and rec.pending:
            # No connection call of this watch saw it: the request object carried another
            # record there (sent through the pool twice at once, or through another watch's
            # entry too). End it now rather than leave it waiting for ever.
            _end(core, rec, hooks)
        return response

    return handle_request


def pool_close(
    core: PoolCore, pool: Any, previous: Any, hooks: Hooks
) -> Callable[[list[Any]], Any]:
    """The replacement for ``pool._close_connections``, sync and async: the connections are
    over when the pool lets go of them. It returns what httpcore's own call returns (for an
    async pool the coroutine the pool awaits, so no frame of poolwatch's is in it)."""
    cls = type(pool)

    def _close_connections(closing: list[Any]) -> Any:
        if closing:
            _pool_closing(core, closing, hooks)
        if previous is not None:
            return previous(closing)
        return cls._close_connections(pool, closing)

    return _close_connections


def _pool_closing(core: PoolCore, closing: list[Any], hooks: Hooks) -> None:
    conns = core.conns
    connections_gone(core, [(id(c), conns.get(id(c))) for c in closing], hooks)


def connections_gone(
    core: PoolCore, gone: Sequence[tuple[int, ConnRecord | None]], hooks: Hooks
) -> None:
    """Close the records of connections that left the pool (``None``: not watched), each on
    its own: an exporter failing on one leaves the others' bookkeeping whole."""
    for key, record in gone:
        if record is None:
            continue
        try:
            _connection_gone(core, record, key, hooks)
        except Exception as exc:
            report_internal_error("connection close bookkeeping", exc)


# -- connections --------------------------------------------------------------------------


def detach_connection(conn: Any, closes_through_pool: bool) -> None:
    """Remove what ``watch_connection()`` attached to a connection."""
    names: tuple[str, ...] = ("handle_async_request", "handle_request")
    if not closes_through_pool:  # else its close is not poolwatch's to remove
        names += ("aclose", "close")
    for name in names:
        _httpcore.remove_instance_attr(conn, name)
    inner = conn
    for _ in range(3):  # a forward proxy's connection holds an HTTPConnection that holds it
        inner = _httpcore.inner_connection(inner)
        release = getattr(inner, _RELEASE, None) if inner is not None else None
        if isinstance(release, _Release):
            release.detach()
            break
    _httpcore.forget_socket(conn)


def watch_connection(
    core: PoolCore,
    conn: Any,
    origin: OriginStats,
    *,
    pool: Any,
    scheme: bytes,
    flavour: Flavour,
    is_async: bool,
    hooks: Hooks,
    closes_through_pool: bool,
    connected: bool = False,
) -> None:
    """Attach poolwatch to a connection the pool just created (or already had).

    ``closes_through_pool``: the pool's close call is watched (``pool_close``); otherwise
    (httpcore before 1.0.3) the connection's own close is."""
    record = ConnRecord(
        origin,
        maybe_h2=_httpcore.may_speak_http2(pool, scheme),
        connected=connected,
    )
    site = _Site(core, conn, record, flavour, hooks)
    core.add_connection(site.key, record)
    cls = type(conn)
    if is_async:
        conn.handle_async_request = _async_connection_call(site, cls)
        if not closes_through_pool:
            conn.aclose = _async_connection_close(site, cls)
    else:
        conn.handle_request = _sync_connection_call(site, cls)
        if not closes_through_pool:
            conn.close = _sync_connection_close(site, cls)


class _Site:
    """What every request through one connection shares (or through one pool-less transport,
    with no connection): built once, so a request's own objects carry one reference to it."""

    __slots__ = ("cna", "conn", "core", "current", "flavour", "hooks", "inner", "key", "record")

    def __init__(
        self,
        core: PoolCore,
        conn: Any,
        record: ConnRecord | None,
        flavour: Flavour,
        hooks: Hooks,
    ) -> None:
        self.core = core
        self.conn = conn
        self.record = record
        self.key = id(conn) if conn is not None else 0
        self.flavour = flavour
        self.hooks = hooks
        self.cna = flavour.connection_not_available
        #: The HTTP/1.1 connection whose release is hooked (see ``_Release``), once hooked.
        self.inner: Any = None
        #: The request whose response that connection is serving, from headers to release.
        self.current: RequestRecord | None = None


def _enter_connection(
    site: _Site, request: Any, is_async: bool
) -> tuple[RequestRecord | None, Any]:
    """Bookkeeping as a request enters a connection; returns (rec, extensions to restore)."""
    try:
        rec: RequestRecord | None = request._poolwatch_record  # see _start()
    except AttributeError:  # not sent through the watched pool's own call
        return None, None
    if rec is None or rec.done:
        return None, None
    record = site.record
    assert record is not None
    traced = record.maybe_h2 or not record.connected
    core = site.core
    try:
        core.acquire(rec, record, not record.maybe_h2)
        if not traced:
            return rec, None
        saved = request.extensions
        user_trace = saved.get("trace")
        request.extensions = {
            **saved,
            "trace": (_async_trace if is_async else _sync_trace)(core, rec, user_trace),
        }
    except Exception as exc:
        report_internal_error("connection acquire", exc)
        return rec, None
    return rec, saved


def _headers_arrived(
    site: _Site, rec: RequestRecord, response: Any, closer: type[_StreamClose]
) -> None:
    """The connection call returned the response headers: watch for the request's end."""
    stream = response.stream
    inner = _httpcore.released_connection(stream)
    ref: _StreamRef | None
    if inner is not None and (inner is site.inner or _hook_release(site, inner, closer)):
        site.current = rec
        try:
            ref = _StreamRef(stream, _stream_collected)  # what detects a leak
            ref.rec = rec
            ref.site = site
        except TypeError as exc:  # a stream class without weak reference support
            report_internal_error("response stream watch", exc)
            ref = None
        watched = True
    else:
        ref = _watch_stream(site, rec, stream, closer)
        watched = ref is not None
    record = site.record
    try:
        http_version = record.http_version if record is not None else None
        if http_version is None:
            raw = response.extensions.get("http_version", b"")
            http_version = "2" if raw == b"HTTP/2" else "1.1" if raw else None
        site.core.headers(rec, response.status, http_version, ref)
    except Exception as exc:
        report_internal_error("response headers bookkeeping", exc)
    if site.hooks.on_headers is not None:
        _call_hook(site.hooks.on_headers, rec, "response headers hook")
    if not watched:
        # Without a close hook the request's end is unknowable: end it now rather than never.
        _stream_closed(site, rec)


def _requeue(core: PoolCore, rec: RequestRecord) -> None:
    try:
        core.requeue(rec)
    except Exception as exc:
        report_internal_error("requeue bookkeeping", exc)


def _connection_call_failed(site: _Site, rec: RequestRecord) -> None:
    try:
        site.core.call_failed(rec)
        record = site.record
        if record is not None and (site.conn.is_closed() or not record.connected):
            _connection_gone(site.core, record, site.key, site.hooks)
    except Exception as exc:
        report_internal_error("connection failure bookkeeping", exc)


def _async_connection_call(site: _Site, cls: type) -> Callable[[Any], Awaitable[Any]]:
    conn = site.conn
    cna = site.cna

    async def handle_async_request(request: Any) -> Any:
        rec, saved = _enter_connection(site, request, is_async=True)
        if rec is None:
            return await cls.handle_async_request(conn, request)  # type: ignore[attr-defined]
        try:
            response = await cls.handle_async_request(conn, request)  # type: ignore[attr-defined]
        except cna:
            _requeue(site.core, rec)
            raise
        except BaseException:
            _connection_call_failed(site, rec)
            raise
        finally:
            if saved is not None:
                request.extensions = saved
        _headers_arrived(site, rec, response, _AsyncStreamClose)
        return response

    return handle_async_request


def _sync_connection_call(site: _Site, cls: type) -> Callable[[Any], Any]:
    conn = site.conn
    cna = site.cna

    def handle_request(request: Any) -> Any:
        rec, saved = _enter_connection(site, request, is_async=False)
        if rec is None:
            return cls.handle_request(conn, request)  # type: ignore[attr-defined]
        try:
            response = cls.handle_request(conn, request)  # type: ignore[attr-defined]
        except cna:
            _requeue(site.core, rec)
            raise
        except BaseException:
            _connection_call_failed(site, rec)
            raise
        finally:
            if saved is not None:
                request.extensions = saved
        _headers_arrived(site, rec, response, _SyncStreamClose)
        return response

    return handle_request


def _async_connection_close(site: _Site, cls: type) -> Callable[[], Awaitable[None]]:
    conn = site.conn

    async def aclose() -> None:
        try:
            await cls.aclose(conn)  # type: ignore[attr-defined]
        finally:
            _closed(site)

    return aclose


def _sync_connection_close(site: _Site, cls: type) -> Callable[[], None]:
    conn = site.conn

    def close() -> None:
        try:
            cls.close(conn)  # type: ignore[attr-defined]
        finally:
            _closed(site)

    return close


def _closed(site: _Site) -> None:
    connections_gone(site.core, ((site.key, site.record),), site.hooks)


def _closed_with_response(site: _Site, conn: Any) -> None:
    """A response ended: ``conn`` (the site's connection, or the HTTP/1.1 one it holds) may
    have closed with it, as httpcore closes one that cannot carry another request."""
    try:
        if conn.is_closed():
            _closed(site)
    except Exception as exc:
        report_internal_error("response close bookkeeping", exc)


# -- trace callbacks (new connections and HTTP/2 only) ------------------------------------

_ASYNC_TRACE_TYPE_ERROR = (
    "If you're using an asynchronous interface, the callback of the `trace` extension should "
    "be an asynchronous function rather than a normal function."
)


def _on_event(core: PoolCore, rec: RequestRecord, name: str) -> None:
    try:
        core.on_trace_event(rec, name)
    except Exception as exc:
        report_internal_error("trace callback", exc)


def _async_trace(
    core: PoolCore, rec: RequestRecord, user_trace: Any
) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    async def trace(name: str, info: dict[str, Any]) -> None:
        _on_event(core, rec, name)
        if user_trace is not None:
            coro = user_trace(name, info)
            if not inspect.iscoroutine(coro):
                raise TypeError(_ASYNC_TRACE_TYPE_ERROR)
            await coro

    return trace


def _sync_trace(
    core: PoolCore, rec: RequestRecord, user_trace: Any
) -> Callable[[str, dict[str, Any]], None]:
    def trace(name: str, info: dict[str, Any]) -> None:
        _on_event(core, rec, name)
        if user_trace is not None:
            user_trace(name, info)

    return trace


# -- the end of a request: the connection-level stream closes -----------------------------


def _request_over(site: _Site, rec: RequestRecord) -> None:
    """The request's response is over; an exception being handled means it failed mid-body.

    ``_end()``'s work written out: this runs at every request's end, one frame fewer."""
    try:
        exc = sys.exception()
        error_type = None
        if exc is not None and (
            site.flavour.owns_exception(exc) or error_type_of(exc) == "cancelled"
        ):
            error_type = error_type_of(exc)
        finished = site.core.finish(rec, error_type)
    except Exception as err:
        report_internal_error("response close bookkeeping", err)
        return
    if finished and site.hooks.on_finish is not None:
        _call_hook(site.hooks.on_finish, rec, "request finish hook")


def _stream_closed(site: _Site, rec: RequestRecord) -> None:
    """A response stream whose close poolwatch wrapped closed (or one it could not watch):
    the request is over, and its connection may have closed with it."""
    _request_over(site, rec)
    if site.record is not None:  # None: a transport without a pool, no connection
        _closed_with_response(site, site.conn)


#: The name of the HTTP/1.1 connection method ``_Release`` replaces.
_RELEASE = _httpcore.RELEASE


class _Release:
    """Replaces an HTTP/1.1 connection's ``_response_closed``, which releases the connection
    when its response closes (read, closed early, or failed mid-body): end the request whose
    response it was, then release. One per connection, for all its requests.

    httpcore also calls it when a request fails before its headers arrive; then no request
    is current (``_headers_arrived`` sets it), and the connection call's failure is handled
    there. The request ends before the release: once released, the connection may carry
    another thread's request, whose headers would make that one current. So its duration
    leaves out the release itself (a lock and, for a connection that closes, the socket's
    close), and an exception the release raises is not the request's: its response was over.
    """

    __slots__ = ("detached", "inner", "site")

    def __init__(self, site: _Site, inner: Any) -> None:
        self.site = site
        self.inner = inner
        #: ``uninstrument()`` came while a response was open: gone after its release.
        self.detached = False

    def request_over(self) -> None:
        """End the request whose response is being released; none is current after."""
        site = self.site
        rec = site.current
        site.current = None
        if self.detached:
            self.remove()
        if rec is not None:
            _request_over(site, rec)

    def detach(self) -> None:
        """Remove this hook now, or after the release of the response open now."""
        if self.site.current is None:
            self.remove()
        else:
            self.detached = True

    def remove(self) -> None:
        if getattr(self.inner, _RELEASE, None) is self:
            delattr(self.inner, _RELEASE)


class _AsyncRelease(_Release):
    __slots__ = ()

    def __call__(self) -> Awaitable[None]:
        """The class's own release, for httpcore to await itself: no frame of poolwatch's
        stays in the await chain (~3,900 instructions a request saved), unless the release is to
        close the connection, which poolwatch must see."""
        self.request_over()
        inner = self.inner
        release: Awaitable[None] = getattr(type(inner), _RELEASE)(inner)  # as it is now
        if _httpcore.release_keeps_open(inner):
            return release
        return self._closing(release)

    async def _closing(self, release: Awaitable[None]) -> None:
        try:
            await release
        finally:
            _closed_with_response(self.site, self.inner)


class _SyncRelease(_Release):
    __slots__ = ()

    def __call__(self) -> None:
        self.request_over()
        inner = self.inner
        try:
            getattr(type(inner), _RELEASE)(inner)  # the class's, as it is now
        finally:
            _closed_with_response(self.site, self.inner)


def _hook_release(site: _Site, inner: Any, closer: type[_StreamClose]) -> bool:
    """Hook the release of a connection's new HTTP/1.1 connection; False if it cannot be."""
    try:
        if not _httpcore.can_hook_release(inner):
            return False
        release = _AsyncRelease if closer is _AsyncStreamClose else _SyncRelease
        setattr(inner, _RELEASE, release(site, inner))
    except Exception as exc:
        report_internal_error("connection release watch", exc)
        return False
    site.inner = inner
    return True


class _StreamRef(weakref.ref):  # type: ignore[type-arg]
    """The weak reference to a response stream that detects leaks: collected before it
    closed means dropped without being closed. It carries what its callback needs, so no
    separate callback object is made per request."""

    __slots__ = ("rec", "site")
    rec: RequestRecord
    site: _Site


def _stream_collected(ref: _StreamRef) -> None:
    """The response stream was freed: leaked, unless its request already ended."""
    if ref.rec.done:
        return
    try:
        ref.site.core.when_unlocked(partial(_leaked, ref.site, ref.rec))
    except Exception as exc:
        report_internal_error("leak detection", exc)


def _leaked(site: _Site, rec: RequestRecord) -> None:
    try:
        if rec.done:
            return
        site.core.leaked(rec)
    except Exception as exc:
        report_internal_error("leak detection", exc)
        return
    _call_hook(site.hooks.on_finish, rec, "request finish hook")


#: Stream classes, by whether they have their own ``aclose`` / ``close`` to wrap.
_CLOSABLE: dict[tuple[type, str], bool] = {}


class _StreamClose:
    """Replaces a response stream's ``aclose`` / ``close``: close it, then end the request.

    One small object per request, and no reference cycle: it reaches the stream through a
    weak reference (the one that detects leaks), so everything a request allocated is freed
    by reference counting as soon as the response is.
    """

    __slots__ = ("inner", "rec", "ref", "site")
    name = ""

    def __init__(self, site: _Site, rec: RequestRecord, stream: Any) -> None:
        self.site = site
        self.rec = rec
        name = self.name
        #: An instance attribute the stream already had (another instrumentation's).
        self.inner = _httpcore.instance_attr(stream, name)
        if self.inner is None:
            kind = (type(stream), name)
            closable = _CLOSABLE.get(kind)
            if closable is None:
                closable = _CLOSABLE[kind] = hasattr(type(stream), name)
            if not closable:
                raise TypeError(f"{type(stream).__qualname__} has no {name}()")
        ref = self.ref = _StreamRef(stream, _stream_collected)
        ref.rec = rec
        ref.site = site

    def closed(self) -> None:
        _stream_closed(self.site, self.rec)
        # Detach, so that this object and the request record are freed now, not when the
        # garbage collector gets to the response's own reference cycle.
        stream = self.ref()
        name = self.name
        if stream is not None and getattr(stream, name, None) is self:
            if self.inner is not None:
                setattr(stream, name, self.inner)
            else:
                delattr(stream, name)


class _AsyncStreamClose(_StreamClose):
    __slots__ = ()
    name = "aclose"

    async def __call__(self) -> None:
        try:
            if self.inner is not None:
                await self.inner()
            else:
                stream = self.ref()
                if stream is not None:
                    await type(stream).aclose(stream)
        finally:
            self.closed()


class _SyncStreamClose(_StreamClose):
    __slots__ = ()
    name = "close"

    def __call__(self) -> None:
        try:
            if self.inner is not None:
                self.inner()
            else:
                stream = self.ref()
                if stream is not None:
                    type(stream).close(stream)
        finally:
            self.closed()


def _watch_stream(
    site: _Site, rec: RequestRecord, stream: Any, closer: type[_StreamClose]
) -> _StreamRef | None:
    """Wrap the stream's close; the weak reference that detects a leak, None if it cannot."""
    try:
        close = closer(site, rec, stream)
        setattr(stream, closer.name, close)
    except Exception as exc:
        report_internal_error("response stream watch", exc)
        return None
    return close.ref


# -- transports without an httpcore pool: request-level figures only ----------------------


def _start_at_transport(core: PoolCore, request: Any, hooks: Hooks) -> RequestRecord | None:
    try:
        url = request.url
        rec = core.start(core.origin((url.raw_scheme, url.raw_host, url.port)), pending=False)
    except Exception as exc:
        report_internal_error("request start", exc)
        return None
    _call_start_hook(hooks, rec, request)
    return rec


def _transport_headers(core: PoolCore, rec: RequestRecord, response: Any, hooks: Hooks) -> None:
    try:
        version = getattr(response, "http_version", "") or ""
        core.headers(
            rec, response.status_code, "2" if version == "HTTP/2" else "1.1" if version else None
        )
    except Exception as exc:
        report_internal_error("response headers bookkeeping", exc)
    _call_hook(hooks.on_headers, rec, "response headers hook")


def _transport_stream(
    site: _Site, rec: RequestRecord, response: Any, closer: type[_StreamClose]
) -> None:
    """Watch a pool-less transport's response for its end (or end it: already read)."""
    if getattr(response, "is_closed", False):  # built from bytes: already read
        _stream_closed(site, rec)
        return
    ref = _watch_stream(site, rec, response.stream, closer)
    if ref is None:  # the request's end is unknowable: end it now rather than never
        _stream_closed(site, rec)
        return
    try:
        site.core.watch_for_leak(rec, ref)
    except Exception as exc:
        report_internal_error("response stream watch", exc)


def async_transport_entry(
    core: PoolCore, transport: Any, previous: Any, flavour: Flavour, hooks: Hooks
) -> Callable[[Any], Awaitable[Any]]:
    """The replacement for ``handle_async_request`` of a transport with no httpcore pool."""
    cls = type(transport)
    site = _Site(core, None, None, flavour, hooks)

    async def handle_async_request(request: Any) -> Any:
        rec = _start_at_transport(core, request, hooks)
        try:
            if previous is not None:
                response = await previous(request)
            else:
                response = await cls.handle_async_request(transport, request)
        except BaseException as exc:
            if rec is not None:
                _failed(core, rec, exc, flavour, hooks)
            raise
        if rec is not None:
            _transport_headers(core, rec, response, hooks)
            _transport_stream(site, rec, response, _AsyncStreamClose)
        return response

    return handle_async_request


def sync_transport_entry(
    core: PoolCore, transport: Any, previous: Any, flavour: Flavour, hooks: Hooks
) -> Callable[[Any], Any]:
    """The replacement for ``handle_request`` of a transport with no httpcore pool."""
    cls = type(transport)
    site = _Site(core, None, None, flavour, hooks)

    def handle_request(request: Any) -> Any:
        rec = _start_at_transport(core, request, hooks)
        try:
            if previous is not None:
                response = previous(request)
            else:
                response = cls.handle_request(transport, request)
        except BaseException as exc:
            if rec is not None:
                _failed(core, rec, exc, flavour, hooks)
            raise
        if rec is not None:
            _transport_headers(core, rec, response, hooks)
            _transport_stream(site, rec, response, _SyncStreamClose)
        return response

    return handle_request
