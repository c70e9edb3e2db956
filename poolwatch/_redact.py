"""``url.full`` without credentials, as the OTel semantic conventions ask, and then some.

- userinfo becomes ``REDACTED:REDACTED`` (semconv ``url.full``);
- the values of the semconv query keys (matched case-sensitively, as semconv says) and of
  the query parameters that carry API keys and tokens (matched case-insensitively) become
  ``REDACTED``, the keys kept: ``?model=x&api_key=REDACTED``;
- the fragment is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

#: semconv ``url.full``: "SHOULD be redacted by default", case-sensitive keys.
SEMCONV_SENSITIVE_KEYS = frozenset(
    {
        "AWSAccessKeyId",
        "Signature",
        "sig",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
        "X-Goog-Signature",
    }
)
#: Parameters that carry API keys and tokens in the wild (compared lower-cased).
CREDENTIAL_KEYS = frozenset(
    {
        "access_token",
        "api-key",
        "api_key",
        "apikey",
        "auth",
        "client_secret",
        "code",
        "id_token",
        "key",
        "password",
        "refresh_token",
        "secret",
        "session_token",
        "sessionid",
        "signature",
        "token",
        "x-api-key",
    }
)
#: Headers never recorded, whatever the configuration says.
FORBIDDEN_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "cookie", "set-cookie", "api-key"}
)

REDACTED = "REDACTED"

#: A URL without any of these has no userinfo, query, fragment or IPv6 host to look at.
_MAY_NEED_REDACTION = re.compile(r"[?@#\[]").search


def redact_url(url: str, extra_keys: Iterable[str] = ()) -> str:
    """``url`` with credentials replaced by ``REDACTED``; ``extra_keys`` extend the list."""
    if _MAY_NEED_REDACTION(url) is None:
        return url  # nothing to redact: skip the parse (this runs once per request)
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}:{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        extra = {k.lower() for k in extra_keys}
        out = []
        for pair in query.split("&"):
            key, sep, _ = pair.partition("=")
            name = unquote(key.replace("+", " "))  # api%5Fkey is api_key
            if sep and (
                name in SEMCONV_SENSITIVE_KEYS
                or name.lower() in CREDENTIAL_KEYS
                or name.lower() in extra
            ):
                out.append(f"{key}={REDACTED}")
            else:
                out.append(pair)
        query = "&".join(out)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
