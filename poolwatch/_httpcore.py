"""The one module that knows the shape of httpx / httpcore and httpx2 / httpcore2.

Everything private poolwatch touches is read or patched here, feature-detected rather than
version-checked, so that an upgrade that moves something degrades one figure instead of
breaking the host:

==========================================  ==========================================
what                                        used for
==========================================  ==========================================
``client._transport``, ``client._mounts``   finding every pool of a client
``transport._pool``                         the httpcore pool behind a default transport
``pool._max_connections``                   the limit (``sys.maxsize`` means unlimited)
``pool._http1``, ``pool._http2``            whether a connection may speak HTTP/2
``pool.create_connection``                  the factory httpcore made for overriding
``pool._close_connections``                 the pool closes connections it dropped
                                            (httpcore >= 1.0.3, httpcore2)
``pool.connections``, ``conn.is_closed()``  public: connection state at scrape time
``conn._origin``                            the origin of connections opened before
                                            poolwatch was installed
``stream._connection``,                     the HTTP/1.1 connection a response stream
``conn._connection``                        releases when closed, and the one an outer
                                            connection holds
``http11._response_closed()``               the HTTP/1.1 connection is released: the
                                            request on it is over
==========================================  ==========================================

Patches are instance attributes only (never a class), so ``uninstrument()`` deletes them and
other instances of the same class are untouched. They are set, read and deleted with
``setattr`` / ``getattr`` / ``delattr``, never through an object's ``__dict__``: on CPython
3.11+ reading ``obj.__dict__`` turns the object's inline attribute values into a dictionary for
good, after which the interpreter stops specialising httpcore's own attribute reads on it
(``self._state``, ``self._h11_state``, ``pool._requests``: ~40 of them per request). That cost
more than all of poolwatch's own per-request bookkeeping (``bench/adaptive.py``). A new
attribute name is the other way to get there: once ~28 instances of a class exist, CPython
3.11 lets one more name into the inline layout that all its instances share, and an object
given any further new name gets a dictionary. So poolwatch adds as few names as it can to
httpcore's classes (one to the HTTP/1.1 connection, one to the pooled connection, whose
close it learns from the pool's ``_close_connections``, three to the pool, of which a process
makes few) and keeps its own per-connection state with itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: The libraries poolwatch knows, by the top-level package of their classes.
_FAMILIES = {
    "httpx": ("httpx", "httpcore"),
    "httpcore": ("httpx", "httpcore"),
    "httpx2": ("httpx2", "httpcore2"),
    "httpcore2": ("httpx2", "httpcore2"),
}

#: Attribute names under which wrapping transports keep the transport they wrap.
_WRAPPED_TRANSPORT_ATTRS = ("_transport", "transport", "_wrapped", "__wrapped__", "_inner", "inner")
#: Attribute names under which SDK clients keep their HTTP client.
_SDK_CLIENT_ATTRS = ("_client", "http_client", "client", "_http_client")


@dataclass(frozen=True, slots=True)
class Flavour:
    """One HTTP client family: httpx with httpcore, or httpx2 with httpcore2."""

    name: str
    httpx: ModuleType
    httpcore: ModuleType

    @property
    def connection_not_available(self) -> type[BaseException]:
        return self.httpcore.ConnectionNotAvailable  # type: ignore[no-any-return]

    @property
    def pool_timeouts(self) -> tuple[type[BaseException], ...]:
        return (self.httpcore.PoolTimeout, self.httpx.PoolTimeout)

    def is_async_client(self, obj: object) -> bool:
        return isinstance(obj, self.httpx.AsyncClient)

    def is_client(self, obj: object) -> bool:
        return isinstance(obj, self.httpx.AsyncClient | self.httpx.Client)

    def is_pool(self, obj: object) -> bool:
        core = self.httpcore
        return isinstance(obj, core.AsyncConnectionPool | core.ConnectionPool)

    def owns_exception(self, exc: BaseException) -> bool:
        """The exception is the library's own (httpx and httpcore rewrite ``__module__`` to
        the package name, so both ``httpcore`` and ``httpcore._exceptions`` occur)."""
        package = type(exc).__module__.partition(".")[0]
        return package in (self.httpx.__name__, self.httpcore.__name__)


_flavours: dict[str, Flavour] = {}


def _flavour_named(family: tuple[str, str]) -> Flavour | None:
    httpx_name, httpcore_name = family
    cached = _flavours.get(httpx_name)
    if cached is not None:
        return cached
    try:
        flavour = Flavour(
            httpx_name,
            importlib.import_module(httpx_name),
            importlib.import_module(httpcore_name),
        )
    except ImportError:
        return None
    _flavours[httpx_name] = flavour
    return flavour


def flavour_of(obj: object) -> Flavour | None:
    """The client family ``obj``'s class comes from (its own class or a base class)."""
    for cls in type(obj).__mro__:
        family = _FAMILIES.get(cls.__module__.partition(".")[0])
        if family is not None:
            return _flavour_named(family)
    return None


def find_client(obj: object) -> tuple[Any, Flavour]:
    """The httpx / httpx2 client ``obj`` is, or holds (SDK clients keep it as ``_client``).

    Raises:
        TypeError: nothing poolwatch can watch was found.
    """
    candidates = [obj]
    candidates += [getattr(obj, attr, None) for attr in _SDK_CLIENT_ATTRS]
    for candidate in candidates:
        if candidate is None:
            continue
        flavour = flavour_of(candidate)
        if flavour is not None and flavour.is_client(candidate):
            return candidate, flavour
    raise TypeError(
        "poolwatch.instrument() expects an httpx or httpx2 Client / AsyncClient, or an SDK "
        "client that holds one (openai.OpenAI, openai.AsyncOpenAI, anthropic.Anthropic, "
        f"anthropic.AsyncAnthropic); got {type(obj).__module__}.{type(obj).__qualname__}"
    )


def transports_of(client: Any) -> list[Any]:
    """Every distinct transport the client routes requests to: default, mounts and proxies.

    The default transport is left out when mounts catch every URL (``proxy=`` mounts
    ``all://``; proxy environment variables mount ``http://`` and ``https://``): its pool
    can never serve a request, and its limit would inflate the pool's capacity.
    """
    found: dict[int, Any] = {}
    mounts = getattr(client, "_mounts", None) or {}
    catch_all = {
        getattr(pattern, "pattern", "")
        for pattern, mounted in mounts.items()
        if mounted is not None
    }
    shadowed = "all://" in catch_all or {"http://", "https://"} <= catch_all
    transport = getattr(client, "_transport", None)
    if transport is not None and not shadowed:
        found[id(transport)] = transport
    for mounted in mounts.values():
        if mounted is not None:
            found.setdefault(id(mounted), mounted)
    return list(found.values())


def pool_of(transport: Any, flavour: Flavour) -> Any | None:
    """The httpcore pool behind a transport, looking through wrapping transports."""
    seen: set[int] = set()
    current = transport
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        pool = getattr(current, "_pool", None)
        if pool is not None and flavour.is_pool(pool):
            return pool
        current = next(
            (
                inner
                for attr in _WRAPPED_TRANSPORT_ATTRS
                if (inner := getattr(current, attr, None)) is not None and inner is not current
            ),
            None,
        )
    return None


def is_async_pool(pool: Any, flavour: Flavour) -> bool:
    return isinstance(pool, flavour.httpcore.AsyncConnectionPool)


def max_connections(pool: Any) -> int | None:
    limit = getattr(pool, "_max_connections", None)
    if not isinstance(limit, int) or limit >= sys.maxsize:
        return None
    return limit


def may_speak_http2(pool: Any, scheme: bytes) -> bool:
    """Whether a new connection of this pool to ``scheme`` could end up on HTTP/2."""
    http1 = getattr(pool, "_http1", True)
    http2 = getattr(pool, "_http2", True)
    return bool(http2) and (scheme in (b"https", b"wss") or not http1)


#: The pool's call that closes the connections it dropped from its list (expired, idle
#: beyond its keep-alive limit, closed by the server, the pool's own close): watched there,
#: the connections need no close hook of their own (one attribute name fewer on their class).
POOL_CLOSE = "_close_connections"


def closes_through_pool(pool: Any) -> bool:
    """Whether the pool closes every connection it drops through ``POOL_CLOSE`` (httpcore
    1.0.3 and later, httpcore2); before 1.0.3 it called each connection's close itself."""
    return callable(getattr(type(pool), POOL_CLOSE, None))


def connections(pool: Any) -> list[Any]:
    """A copy of the pool's connection list (httpcore's public ``connections`` property)."""
    return list(pool.connections)


def connection_origin_key(conn: Any) -> tuple[bytes, bytes, int | None] | None:
    """(scheme, host, port) of a connection poolwatch did not see being created."""
    origin = getattr(conn, "_origin", None) or getattr(conn, "_remote_origin", None)
    if origin is None:
        return None
    return (origin.scheme, origin.host, origin.port)


def connection_http_version(conn: Any) -> str | None:
    """ "1.1" or "2" from the connection's public ``info()``, None while it connects."""
    info = conn.info()
    if "HTTP/2" in info:
        return "2"
    if "HTTP/1.1" in info:
        return "1.1"
    return None


def is_connection_idle(conn: Any) -> bool:
    return bool(conn.is_idle())


class OpenSockets:
    """The sockets of open HTTP/1.1 connections (or of none known yet), ready to be asked,
    all at once and as often as needed, which idle ones the server already closed (their
    socket turned readable: EOF), which httpcore notices only on its next pool pass (its own
    ``has_expired`` rule).

    One ``poll()`` for all of them, on sockets looked up once per connection: httpcore's own
    check asks anyio for every extra attribute of the stream (a ``getpeername()`` included)
    each time, which made a 1,000-connection scrape cost ~70 ms. Busy ones are polled too,
    their answer not taken: which are busy is told at each asking, so the poll object serves
    for as long as the pool keeps its connections, however they take turns.

    A connection past its keep-alive expiry is not dead: its socket stays open until httpcore
    closes it. HTTP/2 connections are never judged from outside: a live idle one also has
    bytes waiting (a PING, a WINDOW_UPDATE, a late RST_STREAM), so they count as httpcore holds
    them, until it drops them.

    Asked again, it is right only while those sockets stay open (a closed one's file
    descriptor may be reused): ``closed()`` says when one was closed.
    """

    __slots__ = (
        "_by_fd",
        "_fds",
        "_filenos",
        "_lock",
        "_no_socket",
        "_poller",
        "polled",
        "unready",
    )

    _fds: list[int]
    polled: set[int]
    _poller: Callable[[], list[int]]
    _lock: threading.Lock

    def __init__(self, conns: list[Any], previous: OpenSockets | None = None) -> None:
        """``previous``: the last ones of the same pools, whose poll object is used again
        when the same connections are polled on the same sockets (a busy pool's usual case)."""
        # Locals throughout: a scrape of 100 busy pools walks ~1,000 connections here.
        by_fd: dict[int, Any] = {}
        no_socket: list[Any] = []
        filenos: list[Callable[[], int]] = []
        unready = 0
        known = _FILENOS.get
        for conn in conns:
            inner = getattr(conn, "_connection", None)
            if inner is None:  # still connecting, or a proxy connection of another shape
                unready += 1
                continue
            entry = known(id(inner))  # inline: a call per connection costs more
            if entry is not None and entry[0]() is inner:
                fileno: Callable[[], int] | None = entry[1]
            else:
                fileno = _fileno_of(inner)
            if fileno is None:  # no socket to poll: httpcore's own check
                no_socket.append(conn)
                continue
            fd = fileno()
            if fd >= 0:
                by_fd[fd] = conn
                filenos.append(fileno)
        self._by_fd = by_fd
        self._no_socket = no_socket
        #: The polled sockets' own ``fileno``, in the order of ``_by_fd``.
        self._filenos = filenos
        #: What the filenos returned (each turns -1 once its socket is closed).
        self._fds = list(by_fd)
        #: HTTP/1.1 connections (or of no version yet) not connected: none of their own.
        self.unready = unready
        if previous is not None and previous._by_fd == by_fd:
            # The same sockets under the same connections: a poll registers descriptors.
            self.polled = previous.polled
            self._poller = previous._poller
            self._lock = previous._lock
            return
        #: The ids of the connections polled.
        self.polled = {id(conn) for conn in by_fd.values()}
        self._poller = _poller(by_fd)
        self._lock = threading.Lock()

    def closed(self) -> bool:
        """One of the polled sockets was closed since (by httpcore, or behind its back)."""
        return [fileno() for fileno in self._filenos] != self._fds

    def dead(self, busy: Container[int] = ()) -> set[int]:
        """The ids of the idle ones (those not ``busy``, by id) the server closed."""
        now = time.monotonic()
        dead = {
            id(conn)
            for conn in self._no_socket
            if id(conn) not in busy and not _past_expiry(conn, now) and conn.has_expired()
        }
        if self._by_fd:
            by_fd = self._by_fd
            with self._lock:  # a poll object takes one caller at a time
                ready = self._poller()
            for fd in ready:  # most often none
                conn = by_fd[fd]
                if id(conn) not in busy and not _past_expiry(conn, now):
                    dead.add(id(conn))
        return dead


def _past_expiry(conn: Any, now: float) -> bool:
    """An HTTP/1.1 connection past its keep-alive expiry (idle ones have one)."""
    expire_at = getattr(getattr(conn, "_connection", None), "_expire_at", None)
    return expire_at is not None and bool(now > expire_at)


def _poller(fds: dict[int, Any]) -> Callable[[], list[int]]:
    """A call that returns which of ``fds`` have something to read (or hit EOF or an error),
    without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return lambda: [fd for fd, _event in poller.poll(0)]
    listed = list(fds)  # Windows: no poll()
    return lambda: select.select(listed, [], [], 0)[0]


#: The socket's ``fileno`` of each HTTP/1.1 connection polled, once looked up, by the id of
#: the connection, with a weak reference to it: the entry is its while the reference still
#: points to it, and goes with it. Kept here, not on the connection: a new attribute name on
#: an object of a class with more than ~28 instances already made moves its attributes into a
#: dictionary (CPython 3.11's shared keys stop growing), which would slow httpcore's own reads
#: on it. Not a ``WeakKeyDictionary``, whose ``get`` is a Python call per connection polled.
_FILENOS: dict[int, tuple[weakref.ref[Any], Callable[[], int]]] = {}


def _fileno_of(inner: Any) -> Callable[[], int] | None:
    """The ``fileno`` of the socket behind an HTTP/1.1 connection (``None``: no socket),
    looked up and kept in ``_FILENOS`` (``OpenSockets`` reads it there first); unwrapped
    from asyncio's and trio's socket wrappers, whose ``fileno`` is a Python call, to the
    socket's own."""
    key = id(inner)
    stream = getattr(inner, "_network_stream", None)
    sock = _socket_of(stream) if stream is not None else None
    raw = getattr(sock, "_sock", None)
    if isinstance(raw, socket.socket):
        sock = raw
    found: Callable[[], int] | None = getattr(sock, "fileno", None)
    if not callable(found):
        return None
    try:
        ref = weakref.ref(inner, functools.partial(_forget_fileno, _FILENOS, key))
    except TypeError:  # not weakly referenceable: looked up each time
        return found
    _FILENOS[key] = (ref, found)  # as long-lived as the connection, and no longer
    return found


def _forget_fileno(
    filenos: dict[int, tuple[weakref.ref[Any], Callable[[], int]]], key: int, ref: weakref.ref[Any]
) -> None:
    """A polled connection went: its entry goes (unless one for a newer object took it).
    The dict comes bound, not from the module: this may run while the interpreter exits."""
    entry = filenos.get(key)
    if entry is not None and entry[0] is ref:
        filenos.pop(key, None)


def _socket_of(stream: Any) -> Any:
    """The socket behind an httpcore network stream.

    Under asyncio, httpcore's stream wraps anyio's, whose ``get_extra_info("socket")`` builds
    every socket attribute anew, with two system calls (~25 µs, once per new connection a
    scrape polls): anyio's own ``_raw_socket`` reads it straight off the transport. Any other
    shape asks the stream.
    """
    wrapped: Any = getattr(stream, "_stream", None)  # httpcore's AnyIOStream
    wrapped = getattr(wrapped, "transport_stream", wrapped)  # anyio's TLSStream
    if isinstance(getattr(type(wrapped), "_raw_socket", None), property):
        try:
            return wrapped._raw_socket
        except Exception:
            pass
    return stream.get_extra_info("socket")


#: Response stream classes, by whether they are httpcore's own HTTP/1.1 stream, whose close
#: ends in its connection's ``_response_closed()``.
_RELEASING: dict[type, bool] = {}


def released_connection(stream: Any) -> Any | None:
    """The HTTP/1.1 connection (httpcore's ``HTTP11Connection``) that ``stream``, a response
    stream of httpcore's own, releases by calling its ``_response_closed()`` when closed;
    ``None`` for any other stream (HTTP/2, a proxy's, another library's).

    That call is the end of the request on the connection, whether the response was read,
    closed early or failed mid-body: one hook per connection sees every request end, where
    wrapping each response stream's close costs an object, a weak reference and an instance
    dictionary per request.
    """
    known = _RELEASING.get(type(stream))
    if known:
        try:
            return stream._connection  # a plain read: getattr() with a default costs twice that
        except AttributeError:
            return None
    if known is None:
        _RELEASING[type(stream)] = _is_releasing(type(stream))
        return released_connection(stream)
    return None


def _is_releasing(cls: type) -> bool:
    if cls.__name__ != "HTTP11ConnectionByteStream":
        return False
    try:
        return cls.__module__.partition(".")[0] in ("httpcore", "httpcore2")
    except Exception:  # a class with a strange __module__: not httpcore's
        return False


def _h11_sentinels() -> tuple[object, object, object]:
    try:
        import h11  # noqa: PLC0415 (httpcore and httpcore2 both need it)
    except ImportError:  # pragma: no cover
        return object(), object(), object()  # sentinels that no state or role is
    return h11.DONE, h11.CLIENT, h11.SERVER


#: h11's state of a side whose message is complete and that may send another, and its two
#: roles (httpcore's HTTP/1.1 connections speak through h11).
_H11_DONE, _H11_CLIENT, _H11_SERVER = _h11_sentinels()

#: The HTTP/1.1 connection's method that releases it when a response closes.
RELEASE = "_response_closed"


def release_keeps_open(inner: Any) -> bool:
    """Whether releasing the HTTP/1.1 connection ``inner`` (``_response_closed()``, about to
    run) keeps it open for another request: httpcore's own test, both sides of the exchange
    done. False when that cannot be told, so that the caller watches the release.

    Read from h11's state table (its ``our_state`` and ``their_state`` properties read the
    same, at three times the cost: ~180 ns a request against ~65).
    """
    try:
        states = inner._h11_state._cstate.states
        return states[_H11_CLIENT] is _H11_DONE and states[_H11_SERVER] is _H11_DONE
    except Exception:
        return False


def can_hook_release(inner: Any) -> bool:
    """Whether ``inner`` has its class's own ``_response_closed()`` (nobody replaced it)."""
    return callable(getattr(type(inner), RELEASE, None)) and instance_attr(inner, RELEASE) is None


def inner_connection(conn: Any) -> Any | None:
    """The HTTP/1.1 or HTTP/2 connection an httpcore ``HTTPConnection`` holds once connected."""
    return getattr(conn, "_connection", None)


def forget_socket(conn: Any) -> None:
    """Remove what ``OpenSockets`` kept on a connection."""
    inner = inner_connection(conn)
    if inner is not None:
        entry = _FILENOS.get(id(inner))
        if entry is not None and entry[0]() is inner:
            _FILENOS.pop(id(inner), None)


# -- instance patches ------------------------------------------------------------------------

_MISSING = object()


def instance_attr(obj: Any, name: str) -> Any | None:
    """What ``obj`` has under ``name`` on itself, shadowing its class (a patch, ours or
    another library's); ``None`` when it has only its class's, even when that is a wrapper
    another library put on the class. Never reads ``obj.__dict__``.

    Meant for methods of classes without ``__slots__`` (httpcore's): a value kept in a slot
    reads as the class's, and a property that makes a new object each time as the object's.
    """
    value = getattr(obj, name, None)
    if value is None:
        return None
    cls = type(obj)
    if getattr(value, "__self__", None) is obj and getattr(value, "__func__", None) is getattr(
        cls, name, None
    ):
        return None  # the class's own function, bound to obj: the common case, made quick
    own = inspect.getattr_static(cls, name, _MISSING)  # the class's, unbound, no lookup
    if own is _MISSING:
        return value
    if value is own:
        return None
    bind = getattr(type(own), "__get__", None)
    if bind is not None:
        try:
            if value == bind(own, obj, cls):  # the class's method (or wrapper), bound to obj
                return None
        except Exception:  # a descriptor that cannot be bound again: count it as the object's
            return value
    return value


def remove_instance_attr(obj: Any, name: str) -> None:
    """Delete an instance attribute if ``obj`` has one (its class's stays).

    Only then: on CPython 3.11 deleting a name the object does not have first adds the name
    to its class's shared layout, and where that is full (a process that made ~28 of them)
    moves the object's attributes into a dictionary, as a new name would."""
    if instance_attr(obj, name) is None:
        return
    with contextlib.suppress(AttributeError):
        delattr(obj, name)


def unpatch(obj: Any, name: str, previous: Any) -> None:
    """Undo an instance patch: restore the previous instance attribute, or remove ours."""
    if previous is not None:
        setattr(obj, name, previous)
    else:
        remove_instance_attr(obj, name)


def iter_pools(client: Any, flavour: Flavour) -> Iterator[tuple[Any, Any | None]]:
    """(transport, pool or None) for every transport of the client."""
    for transport in transports_of(client):
        yield transport, pool_of(transport, flavour)
