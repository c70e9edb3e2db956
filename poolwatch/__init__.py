"""poolwatch: make the connection pool of an httpx / httpx2 client visible.

    client = poolwatch.instrument(httpx.AsyncClient(limits=...), name="openai")
    poolwatch.snapshot(client)       # a PoolSnapshot
    poolwatch.uninstrument(client)   # as it was

Exporters live in ``poolwatch.prometheus`` and ``poolwatch.otel``; nothing is registered or
patched at import time.
"""

from ._api import instrument, snapshot, uninstrument
from ._saturation import SaturationEvent
from ._snapshot import ConnectionGroup, PoolSnapshot
from ._version import __version__

__all__ = [
    "ConnectionGroup",
    "PoolSnapshot",
    "SaturationEvent",
    "__version__",
    "instrument",
    "snapshot",
    "uninstrument",
]
