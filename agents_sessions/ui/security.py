"""Who may see the explorer, and the headers every response carries.

* Listening on loopback only, it serves the local user without a token, but checks
  the ``Host`` header: a web page cannot reach it through DNS rebinding.
* Listening on anything else it refuses to start without a token
  (:meth:`ExplorerAccess.for_bind`). The browser presents the token once as
  ``?token=...`` and gets it back as an ``HttpOnly``, ``SameSite=Strict`` cookie (the
  address bar is then cleaned by a redirect); scripts send ``Authorization: Bearer``.
  Every comparison is constant-time (:func:`hmac.compare_digest`).
* Every response, errors included, carries a Content-Security-Policy that allows no
  script at all and no framing, ``X-Content-Type-Options: nosniff``, ``no-store``
  caching and no referrer.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..errors import ConfigurationError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Name of the cookie that carries the token after the first visit.
TOKEN_COOKIE = "agents_sessions_ui_token"
#: The shortest token accepted: a guessable token protects nothing.
MIN_TOKEN_LENGTH = 16
# What a token may be made of: it travels in a cookie and an Authorization header.
_TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/=-]+")
#: Host names (without port) a loopback-only explorer answers to.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the explorer on this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class ExplorerAccess:
    """The access rule of one explorer: its token (if any) and the hosts it answers to.

    Attributes:
        token: Required on every request when set.
        allowed_hosts: ``Host`` header names (without port) accepted; ``None``: any
            (only with a token).
    """

    token: str | None
    allowed_hosts: frozenset[str] | None

    @classmethod
    def for_bind(cls, host: str, token: str | None) -> ExplorerAccess:
        """The rule for an explorer listening on ``host``.

        Raises:
            ConfigurationError: ``host`` is not loopback and there is no token, or the
                token is too short.
        """
        if token is not None:
            token = token.strip()
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigurationError(
                    f"the token (--token / AGENTS_SESSIONS_UI_TOKEN) must be at least "
                    f"{MIN_TOKEN_LENGTH} characters; generate one with: python -c "
                    "'import secrets; print(secrets.token_urlsafe(32))'"
                )
            if not _TOKEN_CHARACTERS.fullmatch(token):
                raise ConfigurationError(
                    "the token (--token / AGENTS_SESSIONS_UI_TOKEN) may hold only letters, "
                    "digits and . _ ~ + / = -"
                )
        if not is_loopback(host):
            if token is None:
                raise ConfigurationError(
                    f"refusing to serve conversations on {host!r} without a token: anyone "
                    "who can reach that address could read them. Set --token or "
                    "AGENTS_SESSIONS_UI_TOKEN, or listen on 127.0.0.1"
                )
            return cls(token=token, allowed_hosts=None)
        return cls(token=token, allowed_hosts=LOOPBACK_HOSTS if token is None else None)

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is the token (constant-time); always true without one."""
        if self.token is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self.token.encode("utf-8"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ExplorerGuard:
    """ASGI middleware: the access rule, then the security headers on every response."""

    def __init__(self, app: ASGIApp, access: ExplorerAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            status, body, extra_headers = refusal
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        *extra_headers,
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body.encode()})
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        allowed = self.access.allowed_hosts
        if allowed is not None and _host_name(_header(scope, b"host") or "") not in allowed:
            return 400, "This explorer answers on localhost only.\n", []
        if self.access.token is None:
            return None
        query = parse_qsl(bytes(scope.get("query_string", b"")).decode("latin-1"))
        from_query = [value for name, value in query if name == "token"]
        if from_query:
            if not self.access.accepts(from_query[-1]):
                return 401, "Wrong token.\n", []
            # Trade the token in the address bar for a cookie, and clean the address.
            rest = urlencode([(name, value) for name, value in query if name != "token"])
            # One leading slash: "//host/..." would send the browser to another site.
            path = "/" + (scope.get("root_path", "") + scope["path"]).lstrip("/")
            location = path + (f"?{rest}" if rest else "")
            cookie = (
                f"{TOKEN_COOKIE}={self.access.token}; HttpOnly; SameSite=Strict; Path=/"
            ).encode()
            return 303, "", [(b"location", location.encode()), (b"set-cookie", cookie)]
        if self.access.accepts(_presented_token(scope)):
            return None
        return 401, "This explorer needs its token: open it once with ?token=...\n", []


def _presented_token(scope: Scope) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization is not None and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    cookie_header = _header(scope, b"cookie")
    if cookie_header:
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(cookie_header)
        except CookieError:  # a malformed Cookie header presents no token
            return None
        morsel = cookies.get(TOKEN_COOKIE)
        if morsel is not None:
            return morsel.value
    return None
