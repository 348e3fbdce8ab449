"""The server's API key: where it comes from, and the check every request passes first.

The SDK sends its key in ``X-API-Key`` and requires plain keys to start with ``tml-``. The server
resolves its own key from ``--api-key``, else ``$SDFT_SERVE_API_KEY``, else the public default
:data:`DEFAULT_API_KEY`, which is only allowed on a loopback address. A request without the key
gets 401 before any work; the key is never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

API_KEY_ENV = "SDFT_SERVE_API_KEY"
DEFAULT_API_KEY = "tml-sdft-serve-local"
KEY_HEADER = b"x-api-key"


@dataclass(frozen=True)
class ApiKey:
    value: str
    source: str  # "--api-key", "$SDFT_SERVE_API_KEY" or "default"

    @property
    def is_default(self) -> bool:
        return self.value == DEFAULT_API_KEY

    def describe(self) -> str:
        if self.is_default:
            return f"the public default key {DEFAULT_API_KEY} (loopback only)"
        return f"from {self.source} (not shown)"

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"


def resolve_api_key(flag: str | None, env: Mapping[str, str]) -> ApiKey:
    """``--api-key``, else ``$SDFT_SERVE_API_KEY``, else the default; must start with ``tml-``."""
    if flag is not None:
        key = ApiKey(flag.strip(), "--api-key")
    elif env.get(API_KEY_ENV, "").strip():
        key = ApiKey(env[API_KEY_ENV].strip(), f"${API_KEY_ENV}")
    else:
        key = ApiKey(DEFAULT_API_KEY, "default")
    if not key.value.startswith("tml-") or len(key.value) < 8:
        raise ValueError(
            f"the API key ({key.source}) must start with 'tml-' and have at least 8 characters: "
            "the Tinker SDK refuses other plain keys"
        )
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, host_given: bool, key: ApiKey) -> None:
    """Refuse a non-loopback address unless ``--host`` was given and the key is not the default."""
    if is_loopback(host):
        return
    if not host_given:
        raise ValueError(f"binding {host} needs --host given explicitly")
    if key.is_default:
        raise ValueError(
            f"binding the non-loopback address {host} needs an API key that is not the public "
            f"default: pass --api-key or set ${API_KEY_ENV}"
        )


class AuthMiddleware:
    """ASGI middleware: 401 without the right ``X-API-Key``; optional delay per response."""

    def __init__(self, app: Any, *, api_key: str, latency_s: float = 0.0) -> None:
        self.app = app
        self._key = api_key.encode()
        self.latency_s = latency_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == KEY_HEADER), b"")
        if not hmac.compare_digest(given, self._key):
            await _deny(send, "missing" if not given else "wrong")
            return
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        await self.app(scope, receive, send)


async def _deny(send: Any, what: str) -> None:
    body = json.dumps(
        {"detail": f"{what} API key: send the server's key in the X-API-Key header"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
