"""Who may drive a server: the ``Host`` a request names (against DNS rebinding), the ``Origin`` a browser sends
(no page of another site may start streams), and an optional bearer token.

A web page the user visits can make the browser talk to a server on their machine: a WebSocket to
``ws://127.0.0.1:8000`` from any page, a simple POST without a preflight, or, through DNS rebinding, any route
under a name of the attacker's that resolves to 127.0.0.1. The browser always says which page it is
(``Origin``) and which name it used (``Host``), and a page cannot forge either, so:

- ``Host`` must name the server as it listens (bound to loopback: ``localhost``, ``127.0.0.1`` or ``[::1]``
  with its port; bound to another address: that address and port), or one of ``allowed_hosts``. Bound to a
  wildcard address (``0.0.0.0``, ``::``), or where the listening address is not known (an app built without
  it, as under Ray Serve), the loopback names, the machine's host name and any IP address are accepted, on
  any port: a rebinding page needs a DNS name of its own, never an IP literal, and port mappings (containers,
  proxies) change the port. Any other name must be listed; ``*`` turns the check off.
- ``Origin``, where a request has one (browsers send it with every WebSocket and every cross-site POST;
  command-line clients usually do not), must be the server's own (the scheme and the request's ``Host``) or
  one of ``allowed_origins`` (``*``: any).
- With an ``api_key``, every route but ``/health`` needs ``Authorization: Bearer <key>``, or ``?token=<key>``
  where a browser cannot set a header (the WebSocket, the player page, which passes its own ``?token=`` on).

A refusal is one line, as every refusal of the server: 400 a foreign Host, 403 a foreign Origin, 401 a missing
or wrong token; a refused WebSocket handshake gets the same HTTP answer (where the ASGI server supports denial
responses, else a plain 403)."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import require

API_KEY_ENV = "STREAMT1_API_KEY"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
OPEN_PATHS = frozenset({"/health"})  # answered without the token: a load balancer's probe has none
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` / ``[v6][:port]`` as (lower-case name, port or None); None if it is not a host."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:  # a bare IPv6 address (a listening address, never a Host header)
        name, port_text = value, None
    else:
        name, _, port_text = value.partition(":")
        port_text = port_text if ":" in value else None
    name = name.rstrip(".")
    if not (_HOST_NAME.fullmatch(name) or _is_ip(name)):
        return None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether a listening address is loopback-only (``127.0.0.0/8``, ``::1`` or ``localhost``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _token_ok(given: str, key: str) -> bool:
    """Constant-time comparison (of digests, so that not even the length leaks)."""
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(),
                               hashlib.sha256(key.encode("utf-8")).digest())


@dataclass(frozen=True)
class AccessPolicy:
    """What a server accepts (see the module's text). ``bind_host`` / ``bind_port``: where it listens (None:
    not known). ``allowed_hosts``: more Host names, ``name`` (any port) or ``name:port``, or ``*``.
    ``allowed_origins``: more page origins, ``scheme://host[:port]``, or ``*``. ``api_key``: the token every
    route but /health requires (None: none)."""

    bind_host: str | None = None
    bind_port: int | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    api_key: str | None = None

    def __post_init__(self):
        require(self.bind_port is None or (isinstance(self.bind_port, int) and 0 <= self.bind_port < 65536),
                f"port must be in [0, 65535], got {self.bind_port!r}")
        hosts = tuple(_as_list(self.allowed_hosts, "allowed hosts"))
        for entry in hosts:
            require(entry == "*" or _split_host(entry) not in (None, ("", None)),
                    f"allowed host {entry!r} is not a host name, host:port or '*'")
        origins = tuple(o.rstrip("/").lower() for o in _as_list(self.allowed_origins, "allowed origins"))
        for entry in origins:
            require(entry in ("*", "null") or _origin_key(entry) is not None,
                    f"allowed origin {entry!r} is not scheme://host[:port], 'null' or '*'")
        require(self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() == self.api_key
                                         and self.api_key.isprintable() and self.api_key != ""),
                "the API key must be a non-empty string of printable characters without surrounding spaces")
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "allowed_origins", origins)

    @classmethod
    def from_environment(cls, **options) -> "AccessPolicy":
        """``options``, the API key taken from ``$STREAMT1_API_KEY`` unless given (an empty variable: none)."""
        if options.get("api_key") is None:
            options["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(**options)

    @property
    def exposed(self) -> bool:
        """Listening beyond loopback (or where that is not known)."""
        return self.bind_host is None or not is_loopback(self.bind_host)

    def _own_host(self, name: str, port: int) -> bool:
        bind = None if self.bind_host is None else self.bind_host.strip("[]").lower()
        if bind is None or bind in WILDCARD_ADDRESSES:
            return name in LOOPBACK_NAMES or _is_ip(name) or name == socket.gethostname().lower()
        names = LOOPBACK_NAMES | {bind} if is_loopback(bind) else {bind}
        return name in names and (self.bind_port in (None, 0) or port == self.bind_port)

    def host_allowed(self, host: str, scheme: str) -> bool:
        """Whether a request's ``Host`` header names this server."""
        if "*" in self.allowed_hosts:
            return True
        parsed = _split_host(host)
        if parsed is None or not parsed[0]:
            return False
        name, port = parsed
        port = port if port is not None else _DEFAULT_PORTS.get(scheme, 80)
        if self._own_host(name, port):
            return True
        for entry in self.allowed_hosts:
            allowed_name, allowed_port = _split_host(entry)
            if allowed_name == name and allowed_port in (None, port):
                return True
        return False

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """Whether a page of ``origin`` may use the server it reached as ``host`` over ``scheme``."""
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        page = _origin_key(origin)
        if page is None:
            return False
        own_scheme = "https" if scheme in ("https", "wss") else "http"
        if page == _origin_key(f"{own_scheme}://{host.strip().lower()}"):
            return True
        return any(page == _origin_key(o) for o in self.allowed_origins if o != "null")

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, one-line message) for a request this policy refuses, else None."""
        headers = {}
        for key, value in scope.get("headers") or ():
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        scheme = scope.get("scheme", "http")
        host = headers.get("host", "")
        if not self.host_allowed(host, scheme):
            return 400, (f"Host {host!r} does not name this server; start it with --allowed-hosts to accept "
                         "another name")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host, scheme):
            return 403, (f"pages of origin {origin!r} may not use this server; start it with --allowed-origins "
                         "to allow them")
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return None
        given = None
        authorization = headers.get("authorization")
        if authorization is not None:
            kind, _, value = authorization.partition(" ")
            given = value.strip() if kind.lower() == "bearer" else ""
        if given is None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [None])[0]
        if given is None:
            return 401, "this server requires an API key: send 'Authorization: Bearer <key>' (or ?token=<key>)"
        if not _token_ok(given, self.api_key):
            return 401, "wrong API key"
        return None


def _as_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    require(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
            f"{what} must be a list of strings, got {value!r}")
    return [part.strip() for v in value for part in v.split(",") if part.strip()]


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the scheme's default port filled in; None if it is not one."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.rstrip("."), port if port is not None else _DEFAULT_PORTS[parts.scheme]


class AccessGuard:
    """ASGI middleware: every HTTP request and WebSocket handshake passes ``policy`` before any route runs."""

    def __init__(self, app, policy: AccessPolicy, on_refuse=None):
        self.app, self.policy, self.on_refuse = app, policy, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refused = self.policy.refusal(scope)
        if refused is None:
            return await self.app(scope, receive, send)
        status, message = refused
        if self.on_refuse is not None:
            self.on_refuse(scope)
        body = json.dumps({"error": message, "status": status}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="streamt1"'))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # the ASGI server answers a handshake closed before it is accepted with 403
            await send({"type": "websocket.close", "code": 1008})


def exposure_warning(policy: AccessPolicy, host: str, port: int) -> str | None:
    """The start-up warning for a server anyone on the network can drive, or None."""
    if policy.api_key is not None or not policy.exposed:
        return None
    return (f"warning: serving on {host}:{port}, beyond loopback, without an API key: anyone who can reach this "
            f"address can start streams on this machine; set ${API_KEY_ENV} (or --api-key) to require a token")


__all__ = ["API_KEY_ENV", "AccessGuard", "AccessPolicy", "exposure_warning", "is_loopback"]
