"""``ClientWatch``: poolwatch attached to one client, every pool of it, and detachable."""

from __future__ import annotations

import weakref
from collections import Counter
from operator import attrgetter, itemgetter
from types import MappingProxyType
from typing import Any, TypeAlias, cast

from . import _httpcore, _shells
from ._core import NO_ERRORS, ConnRecord, CoreSnapshot, OriginStats, PoolCore
from ._httpcore import Flavour
from ._safety import report_internal_error
from ._saturation import Pressure, SaturationCallback, SaturationMonitor
from ._snapshot import ConnectionGroup, PoolSnapshot, new_connection_group, new_pool_snapshot


class _PoolPatch:
    """The patches on one httpcore pool, and what they replaced."""

    __slots__ = ("entry_name", "pool", "previous_close", "previous_create", "previous_entry")

    def __init__(
        self,
        pool: Any,
        entry_name: str,
        previous_entry: Any,
        previous_create: Any,
        previous_close: Any,
    ):
        self.pool = pool
        self.entry_name = entry_name
        self.previous_entry = previous_entry
        self.previous_create = previous_create
        #: What the pool had under ``_httpcore.POOL_CLOSE``; ``False``: not patched (an
        #: httpcore before 1.0.3, whose connections are watched for their close instead).
        self.previous_close = previous_close


class _TransportPatch:
    """A transport without an httpcore pool: request-level figures only."""

    __slots__ = ("entry_name", "previous", "transport")

    def __init__(self, transport: Any, entry_name: str, previous: Any) -> None:
        self.transport = transport
        self.entry_name = entry_name
        self.previous = previous


_GROUP_ORDER = attrgetter("scheme", "address", "port", "state", "http_version")
_NEW = attrgetter("requests_new")
_REUSED = attrgetter("requests_reused")
_CREATED = attrgetter("connections_created")
_TIMEOUTS = attrgetter("timeouts")
_ERRORS = attrgetter("errors")
_IDLE_GROUP = itemgetter(0)


#: A group of open connections: (origin, state, protocol version).
_GroupKey: TypeAlias = tuple[OriginStats, str, str]
#: An origin's groups of one protocol version: idle, active, connecting.
_Groups: TypeAlias = tuple[_GroupKey, _GroupKey, _GroupKey]


class _Reading:
    """The last full reading of a client's connections, and how to tell they are its
    connections still.

    The core's connection count catches the connections poolwatch sees join and leave; the
    connection lists catch anything else that adds, drops or closes one (a path where
    poolwatch's own bookkeeping failed); the sockets' poll catches the server closing an idle
    one. While those stand, and no response leaked since, the connections are the same, and
    only their states are read again: from the core's load, one look per request in flight,
    and one poll per pool. ``table`` and ``groups`` hold what that takes, once every open
    connection was settled (connected, its protocol known, watched); else the next reading is
    a full one.

    A reading of a client at rest is its whole snapshot for as long as the core's change
    count stands (``at_rest_at``), once the poll shows no other idle connection closed.
    """

    __slots__ = (
        "_unpolled",
        "at_rest_at",
        "base",
        "busy",
        "connection_changes",
        "dead",
        "groups",
        "leaked",
        "opened",
        "snapshot",
        "sockets",
        "table",
        "walked",
    )

    def __init__(
        self,
        counts: tuple[int, int, int],
        walked: list[tuple[list[Any], list[Any]]],
        sockets: _httpcore.OpenSockets,
        snapshot: PoolSnapshot,
        busy: set[int],
        dead: set[int],
    ) -> None:
        #: The core's connection changes and leaked responses when it was read.
        _, self.connection_changes, self.leaked = counts
        #: Each pool's connections then, and the open ones among them.
        self.walked = walked
        #: Per pool, the open ones whose socket is not polled (HTTP/2 ones), found on the
        #: first check.
        self._unpolled: list[list[Any]] | None = None
        self.sockets = sockets  # the open connections' sockets, to ask again
        self.snapshot = snapshot
        #: The connections busy (by id) then, and the idle ones the server had closed.
        self.busy = busy
        self.dead = dead
        #: The core's change count of which ``snapshot`` is the reading at rest.
        self.at_rest_at: int | None = None
        #: Each open connection's id, by its record; ``None``: not all settled.
        self.table: dict[ConnRecord, int] | None = None
        #: Each open connection's groups, by its record.
        self.groups: dict[ConnRecord, _Groups] = {}
        #: Every open connection counted in its idle group, and how many are open.
        self.base: dict[_GroupKey, int] = {}
        self.opened = 0

    def still_true(self, pools: list[_PoolPatch]) -> bool:
        """No pool's connections changed, and none was closed, the server's closes aside."""
        sockets = self.sockets
        if len(pools) != len(self.walked):
            return False
        for p, (listed, _) in zip(pools, self.walked, strict=True):
            if _httpcore.connections(p.pool) != listed:  # by identity: connections have no __eq__
                return False
        unpolled = self._unpolled
        if unpolled is None:
            polled = sockets.polled
            unpolled = self._unpolled = [
                [c for c in still_open if id(c) not in polled] for _, still_open in self.walked
            ]
        for conns in unpolled:  # the polled ones' sockets say it themselves, below
            for conn in conns:
                if conn.is_closed():
                    return False
        return not sockets.closed()


class ClientWatch:
    """poolwatch's attachment to one httpx / httpx2 client."""

    def __init__(
        self,
        client: Any,
        flavour: Flavour,
        core: PoolCore,
        *,
        saturation: SaturationMonitor | None = None,
        on_saturation: SaturationCallback | None = None,
    ) -> None:
        self.name = core.name
        self.core = core
        self.flavour = flavour
        self.is_async = flavour.is_async_client(client)
        self._client = weakref.ref(client)
        self.hooks = _shells.Hooks()
        self.saturation = saturation
        self.on_saturation = on_saturation
        self._pools: list[_PoolPatch] = []
        self._transports: list[_TransportPatch] = []
        self._reading: _Reading | None = None
        #: Each origin's groups, by protocol version: made once, so a reading makes no tuple
        #: per connection (each one counts toward the next young garbage collection).
        self._group_keys: dict[OriginStats, dict[str, _Groups]] = {}
        #: The sockets the last full reading polled (its poll object may serve again).
        self._sockets: _httpcore.OpenSockets | None = None
        self._last_groups: tuple[dict[_GroupKey, int], tuple[ConnectionGroup, ...]] = ({}, ())
        for transport, pool in _httpcore.iter_pools(client, flavour):
            if pool is not None:
                if not any(p.pool is pool for p in self._pools):
                    self._attach_pool(pool)
            else:
                self._attach_transport(transport)

    # -- attaching -------------------------------------------------------------------------

    def _attach_pool(self, pool: Any) -> None:
        core, flavour, hooks = self.core, self.flavour, self.hooks
        is_async = _httpcore.is_async_pool(pool, flavour)
        entry_name = "handle_async_request" if is_async else "handle_request"
        previous_entry = _httpcore.instance_attr(pool, entry_name)
        make_entry = _shells.async_pool_entry if is_async else _shells.sync_pool_entry
        entry = make_entry(core, pool, previous_entry, flavour, hooks)

        previous_create = _httpcore.instance_attr(pool, "create_connection")
        through_pool = _httpcore.closes_through_pool(pool)
        previous_close = (
            _httpcore.instance_attr(pool, _httpcore.POOL_CLOSE) if through_pool else False
        )
        cls = type(pool)

        def create_connection(origin: Any) -> Any:
            if previous_create is not None:
                conn = previous_create(origin)
            else:
                conn = cls.create_connection(pool, origin)
            try:
                _shells.watch_connection(
                    core,
                    conn,
                    core.origin((origin.scheme, origin.host, origin.port)),
                    pool=pool,
                    scheme=origin.scheme,
                    flavour=flavour,
                    is_async=is_async,
                    hooks=hooks,
                    closes_through_pool=through_pool,
                )
            except Exception as exc:
                report_internal_error("connection watch", exc)
            return conn

        # Connections opened before instrument(): watch them too, as already connected.
        for conn in _httpcore.connections(pool):
            key = _httpcore.connection_origin_key(conn)
            if key is None or conn.is_closed():
                continue
            _shells.watch_connection(
                core,
                conn,
                core.origin(key),
                pool=pool,
                scheme=key[0],
                flavour=flavour,
                is_async=is_async,
                hooks=hooks,
                connected=_httpcore.connection_http_version(conn) is not None,
                closes_through_pool=through_pool,
            )
        setattr(pool, entry_name, entry)
        pool.create_connection = create_connection
        if through_pool:
            close = _shells.pool_close(core, pool, previous_close, hooks)
            setattr(pool, _httpcore.POOL_CLOSE, close)
        self._pools.append(
            _PoolPatch(pool, entry_name, previous_entry, previous_create, previous_close)
        )

    def _attach_transport(self, transport: Any) -> None:
        is_async = self.is_async
        entry_name = "handle_async_request" if is_async else "handle_request"
        previous = _httpcore.instance_attr(transport, entry_name)
        make = _shells.async_transport_entry if is_async else _shells.sync_transport_entry
        setattr(
            transport, entry_name, make(self.core, transport, previous, self.flavour, self.hooks)
        )
        self._transports.append(_TransportPatch(transport, entry_name, previous))

    def detach(self) -> None:
        """Restore every pool, connection and transport as it was."""
        for p in self._pools:
            _httpcore.unpatch(p.pool, p.entry_name, p.previous_entry)
            _httpcore.unpatch(p.pool, "create_connection", p.previous_create)
            if p.previous_close is not False:
                _httpcore.unpatch(p.pool, _httpcore.POOL_CLOSE, p.previous_close)
            for conn in _httpcore.connections(p.pool):
                _shells.detach_connection(conn, p.previous_close is not False)
        for t in self._transports:
            _httpcore.unpatch(t.transport, t.entry_name, t.previous)
        self._pools.clear()
        self._transports.clear()
        self._reading = None
        self._sockets = None

    @property
    def alive(self) -> bool:
        """The client exists and is not closed: its pools are worth exporting."""
        client = self._client()
        return client is not None and not getattr(client, "is_closed", False)

    @property
    def pools(self) -> list[Any]:
        return [p.pool for p in self._pools]

    # -- reading ---------------------------------------------------------------------------

    def max_connections(self) -> int | None:
        if not self._pools:
            return None
        total = 0
        for p in self._pools:
            limit = _httpcore.max_connections(p.pool)
            if limit is None:
                return None
            total += limit
        return total

    def _connection_groups(self, groups: dict[_GroupKey, int]) -> tuple[ConnectionGroup, ...]:
        """The groups as the snapshot shows them; the last ones again while they are equal
        (a busy pool's connections change state, their groups seldom do)."""
        last_groups, last = self._last_groups
        if groups == last_groups:
            return last
        made = tuple(
            sorted(
                (
                    new_connection_group(o.scheme, o.address, o.port, state, version, n)
                    for (o, state, version), n in groups.items()
                ),
                key=_GROUP_ORDER,
            )
        )
        self._last_groups = (groups, made)
        return made

    def pressure(self) -> Pressure:
        """Busy connections, the limit and the waiting requests: the saturation sampler's
        reading each second, without the histograms, origins and idle-socket poll of a full
        ``snapshot()``. Busy is what ``snapshot()`` counts as active."""
        core = self.core
        if core.deferred:  # a leak found while the lock was held: counted within a second
            core.run_deferred()
        pending, pending_age = core.waiting()
        conns = core.conns
        load = core.connection_load()
        active = 0
        for p in self._pools:
            try:
                for conn in _httpcore.connections(p.pool):
                    if conn.is_closed():
                        continue
                    record = conns.get(id(conn))
                    if record is not None:
                        active += record in load  # as snapshot() tells idle
                    elif _httpcore.connection_origin_key(conn) is not None:
                        active += not _httpcore.is_connection_idle(conn)
            except Exception as exc:  # that pool's connections are missing, as in snapshot()
                report_internal_error("pool read", exc)
        limit = self.max_connections()
        return Pressure(
            name=self.name,
            max_connections=limit,
            active_connections=active,
            utilization=(active / limit) if limit else 0.0,
            pending_requests=pending,
            pending_max_age=pending_age,
        )

    def snapshot(self) -> PoolSnapshot:
        """Read the pools and the core, and put them together.

        A client at rest is read once: while nothing is in flight and the core has not
        changed, the last snapshot is still true, once a poll shows the server closed none of
        its idle connections since (scrapes and OTel collections read every pool, most of
        them quiet; the saturation sampler takes the lighter ``pressure()``). A client whose
        connections are those of the last reading, busy or read between its requests, has
        only their states and its core read again (see ``_Reading``).
        """
        core = self.core
        if core.deferred:
            core.run_deferred()
        # Read before the pools: a change made while they are read shows as a change later.
        counts = (core.changes, core.connection_changes, core.leaked_count)
        at_rest = core.active == 0
        last = self._reading
        if last is not None:
            try:
                if last.still_true(self._pools):
                    if (
                        at_rest
                        and last.at_rest_at == counts[0]
                        and last.sockets.dead(last.busy) == last.dead
                    ):
                        return last.snapshot
                    if (
                        last.table is not None
                        and last.connection_changes == counts[1]
                        and last.leaked == counts[2]
                    ):
                        return self._read_states(last, counts[0], at_rest)
            except Exception:  # read in full below, which reports the failure
                pass
        return self._read_in_full(counts, at_rest)

    def _read_states(self, reading: _Reading, changes: int, at_rest: bool) -> PoolSnapshot:
        """The snapshot of connections known from ``reading``: each is active while a request
        (or a leaked response) holds it, else idle, unless the server closed it. A few steps
        per request in flight and one poll, however many connections the pools hold."""
        core = self.core
        load = core.connection_load()
        quiet = core.changes == changes  # see _read_in_full
        table = cast(dict[ConnRecord, int], reading.table)
        by_record = reading.groups
        groups = reading.base.copy()
        busy: set[int] = set()
        for record in load:
            conn_id = table.get(record)  # None: a closed one's, still in a request's hands
            if conn_id is not None:
                busy.add(conn_id)
                idle, active, _ = by_record[record]
                groups[idle] -= 1
                groups[active] = groups.get(active, 0) + 1
        dead = reading.sockets.dead(busy)
        if dead:
            idle_groups = {conn_id: by_record[record][0] for record, conn_id in table.items()}
            for conn_id in dead:
                groups[idle_groups[conn_id]] -= 1
        snap = self._with_core(
            core.snapshot(),
            len(busy),
            reading.opened - len(busy) - len(dead),
            0,
            self._connection_groups({key: n for key, n in groups.items() if n}),
            0,
        )
        reading.snapshot = snap
        reading.busy = busy
        reading.dead = dead
        reading.at_rest_at = changes if at_rest and quiet else None
        return snap

    def _read_in_full(self, counts: tuple[int, int, int], at_rest: bool) -> PoolSnapshot:
        """Walk every connection of every pool, and keep what that found for the next
        readings (``_Reading``)."""
        core = self.core
        walked: list[tuple[list[Any], list[Any]]] = []  # (connections, the open ones) by pool
        # Open connections by (origin, state, protocol version).
        groups: dict[_GroupKey, int] = {}
        polled: list[Any] = []  # the open ones but HTTP/2 ones
        opened = 0
        not_idle: set[int] = set()  # active and connecting ones, by id
        idle_keys: dict[int, _GroupKey] = {}
        table: dict[ConnRecord, int] | None = {}
        by_record: dict[ConnRecord, _Groups] = {}
        group_keys = self._group_keys
        conns = core.conns
        recorded = list(conns.items())  # before the walk: one opened during it is not judged
        matched = 0  # of the open connections listed, those with a record
        load = core.connection_load()
        # No request started since the counts were read (each start moves ``changes`` before
        # it can hold a connection): the load, and so each connection's state, is the one of
        # a client at rest. Else a request that came in between shows its connection active,
        # and that is no reading of a client at rest.
        quiet = core.changes == counts[0]
        unreadable = 0
        for p in self._pools:
            try:
                listed = _httpcore.connections(p.pool)
                still_open: list[Any] = []
                walked.append((listed, still_open))
                for conn in listed:
                    if conn.is_closed():  # httpcore's public connection interface
                        continue
                    still_open.append(conn)
                    record = conns.get(id(conn))
                    if record is None:  # its watch failed: read it from httpcore itself
                        table = None
                        origin_key = _httpcore.connection_origin_key(conn)
                        if origin_key is None:
                            continue
                        origin = core.origin(origin_key)
                        is_idle = _httpcore.is_connection_idle(conn)
                        connecting = False
                        version = _httpcore.connection_http_version(conn) or ""
                    else:
                        matched += 1
                        origin = record.origin
                        version = record.http_version or ""
                        is_idle = record not in load
                        connecting = not record.connected
                        if table is not None and (connecting or not version):
                            table = None  # its groups are still to be known
                        connecting = is_idle and connecting
                        if is_idle and not connecting and not version:
                            version = _httpcore.connection_http_version(conn) or ""
                    if version != "2":
                        polled.append(conn)
                    versions = group_keys.get(origin)
                    keys = versions.get(version) if versions is not None else None
                    if keys is None:
                        keys = self._new_group_keys(origin, version)
                    if table is not None and record is not None:
                        table[record] = id(conn)
                        by_record[record] = keys
                    if connecting:
                        key = keys[2]
                        not_idle.add(id(conn))
                    elif is_idle:
                        key = keys[0]
                        idle_keys[id(conn)] = key  # unless the server closed it, below
                    else:
                        key = keys[1]
                        not_idle.add(id(conn))
                    groups[key] = groups.get(key, 0) + 1
                opened += len(still_open)
            except Exception as exc:
                unreadable += 1
                report_internal_error("pool read", exc)
        sockets: _httpcore.OpenSockets | None = None
        dead: set[int] = set()
        try:
            sockets = _httpcore.OpenSockets(polled, self._sockets)
            dead = sockets.dead(not_idle)
            self._sockets = sockets
        except Exception as exc:  # not known: count them all, and read in full next time
            sockets = self._sockets = None
            report_internal_error("pool read", exc)
        if dead:  # closed by the server; httpcore has not noticed yet
            for conn_id in dead:
                groups[idle_keys[conn_id]] -= 1
            groups = {key: n for key, n in groups.items() if n}
        if matched < len(recorded) and not unreadable:
            # Records of connections no pool lists open any more, whose close no hook saw
            # (closed by a direct call, or an HTTP/2 connection that read a GOAWAY while
            # idle): they end now, as soon as poolwatch can tell.
            open_ids = {id(c) for _, still_open in walked for c in still_open}
            gone = [(key, record) for key, record in recorded if key not in open_ids]
            _shells.connections_gone(core, gone, self.hooks)
        by_state = {"active": 0, "idle": 0, "connecting": 0}
        for (_o, state, _v), n in groups.items():
            by_state[state] += n
        snap = self._with_core(
            core.snapshot(),
            by_state["active"],
            by_state["idle"],
            by_state["connecting"],
            self._connection_groups(groups),
            unreadable,
        )
        if sockets is None or unreadable:
            self._reading = None
            return snap
        reading = self._reading = _Reading(counts, walked, sockets, snap, not_idle, dead)
        if at_rest and quiet:
            reading.at_rest_at = counts[0]
        if table is not None and len(table) == opened and not sockets.unready:
            reading.table = table
            reading.groups = by_record
            reading.base = dict(Counter(map(_IDLE_GROUP, by_record.values())))  # counted in C
            reading.opened = opened
        return snap

    def _new_group_keys(self, origin: OriginStats, version: str) -> _Groups:
        """An origin's groups of one protocol version, made once (``_group_keys``)."""
        keys = (
            (origin, "idle", version),
            (origin, "active", version),
            (origin, "connecting", version),
        )
        self._group_keys.setdefault(origin, {})[version] = keys
        return keys

    def _with_core(
        self,
        s: CoreSnapshot,
        active: int,
        idle: int,
        connecting: int,
        connections: tuple[ConnectionGroup, ...],
        unreadable: int,
    ) -> PoolSnapshot:
        """The pool's snapshot: the core's reading, with its connections as read."""
        limit = self.max_connections()
        origins = s.origins
        # Summed in C: a scrape of 100 pools sums 500 origins here.
        reused = sum(map(_REUSED, origins))
        requests = sum(map(_NEW, origins)) + reused
        errors: dict[str, int] = {}
        for o in filter(_ERRORS, origins):
            for error_type, n in o.errors.items():
                errors[error_type] = errors.get(error_type, 0) + n
        return new_pool_snapshot(
            name=self.name,
            max_connections=limit,
            active_connections=active,
            idle_connections=idle,
            pending_requests=s.pending_requests,
            active_requests=s.active_requests,
            utilization=(active / limit) if limit else 0.0,
            requests_total=requests,
            reused_requests_total=reused,
            connections_created_total=sum(map(_CREATED, origins)),
            pool_timeouts_total=sum(map(_TIMEOUTS, origins)),
            leaked_responses_total=s.leaked_responses,
            reuse_ratio=(reused / requests) if requests else None,
            connecting_connections=connecting,
            pending_max_age=s.pending_max_age,
            active_max_age=s.active_max_age,
            errors=MappingProxyType(errors) if errors else NO_ERRORS,
            connections=connections,
            origins=origins,
            unreadable_pools=unreadable,
            connect_time=s.connect_time,
            tls_time=s.tls_time,
            time_to_first_byte=s.time_to_first_byte,
            request_duration=s.request_duration,
        )
