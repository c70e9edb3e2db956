"""Instrumentation never breaks the host.

poolwatch code runs inside the host's requests (bookkeeping, trace callbacks, stream close),
inside its scrapes and inside its log handlers. Every such site catches poolwatch's own
``Exception`` and logs it once per site on the ``poolwatch`` logger; ``BaseException`` that is
not an ``Exception`` (cancellation, ``KeyboardInterrupt``) always propagates, and the host's
own exceptions are re-raised untouched by the shells, never wrapped.
"""

from __future__ import annotations

import contextlib
import logging
import threading

logger = logging.getLogger("poolwatch")

_reported: set[str] = set()
_reported_lock = threading.Lock()


def report_internal_error(site: str, exc: BaseException) -> None:
    """Log poolwatch's own failure at ``site``, once per site for the process's lifetime."""
    with _reported_lock:
        if site in _reported:
            return
        _reported.add(site)
    # A broken log handler must not break the host either.
    with contextlib.suppress(Exception):
        logger.error(
            "poolwatch internal error in %s (the request was not affected; "
            "further errors at this site are not logged): %s: %s",
            site,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )


def reset_reported_errors() -> None:
    """Forget which sites already logged (for tests)."""
    with _reported_lock:
        _reported.clear()
