"""The real Tinker service, with fast failure where the SDK alone would block or be vague.

``tinker.ServiceClient`` does no I/O when constructed; its first ``create_*`` call fails at once
without a key but blocks for about six minutes (layered retries) when the service cannot be
reached. :func:`create_service_client` therefore checks, before building the client, that
``TINKER_API_KEY`` is set and that the host of the base URL accepts a TCP connection within a few
seconds. Errors during a run (rate limits, 5xx, dropped connections) are left to the SDK's own
retries. The key is never printed or logged.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from urllib.parse import urlsplit

API_KEY_ENV = "TINKER_API_KEY"
BASE_URL_ENV = "TINKER_BASE_URL"
DEFAULT_PROBE_TIMEOUT_S = 5.0


class TinkerUnavailableError(ConnectionError):
    """The Tinker service cannot be used: no API key, or the base URL cannot be reached."""


def resolve_base_url(base_url: str | None, env: Mapping[str, str] | None = None) -> str:
    """The URL the SDK will talk to: ``base_url``, else ``$TINKER_BASE_URL``, else production."""
    from tinker.lib.base_url import DEFAULT_BASE_URL

    env = os.environ if env is None else env
    return (base_url or env.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def check_api_key(env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`TinkerUnavailableError` naming ``TINKER_API_KEY`` when it is not set."""
    env = os.environ if env is None else env
    if not env.get(API_KEY_ENV, "").strip():
        raise TinkerUnavailableError(
            f"{API_KEY_ENV} is not set: backend.kind: tinker needs a Tinker API key "
            f"(export {API_KEY_ENV}=..., or use backend.kind: local to train offline)"
        )


def _resolve_host(host: str, port: int, timeout: float) -> list[tuple]:
    """``getaddrinfo`` bounded by ``timeout`` (it has no timeout of its own and can block for a
    long time when no DNS server answers); runs in a daemon thread that may outlive the call."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome["value"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="sdft-dns-probe", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"DNS lookup of {host} took longer than {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def probe(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the host and port of ``url`` within about ``timeout``
    seconds (DNS lookup and connect each bounded by it).

    Raises :class:`TinkerUnavailableError` saying it cannot connect to ``url`` (unknown host,
    refused, unreachable network or timeout).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TinkerUnavailableError(f"cannot connect to {url}: not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise TinkerUnavailableError(f"cannot connect to {url}: {exc}") from None
    host = parts.hostname
    try:
        addresses = _resolve_host(host, port, timeout)
    except socket.gaierror as exc:
        raise TinkerUnavailableError(
            f"cannot connect to {url}: host {host!r} not found ({exc.strerror})"
        ) from None
    except TimeoutError as exc:
        raise TinkerUnavailableError(f"cannot connect to {url}: {exc}") from None
    except OSError as exc:
        raise TinkerUnavailableError(
            f"cannot connect to {url}: cannot resolve {host!r} ({exc.strerror or exc})"
        ) from None
    failures = []
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as connection:
                connection.settimeout(timeout)
                connection.connect(address)
            return
        except TimeoutError:
            failures.append(f"no answer from {address[0]}:{port} within {timeout:g} s")
        except OSError as exc:
            failures.append(f"{exc.strerror or type(exc).__name__} ({address[0]}:{port})")
    raise TinkerUnavailableError(f"cannot connect to {url}: {'; '.join(dict.fromkeys(failures))}")


def create_service_client(
    base_url: str | None = None,
    *,
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
):
    """A ``tinker.ServiceClient`` for ``base_url``, after checking the key and reachability."""
    env = os.environ if env is None else env
    check_api_key(env)
    url = resolve_base_url(base_url, env)
    probe(url, timeout=probe_timeout)
    import tinker

    from sdft.redact import register_secret

    api_key = env[API_KEY_ENV].strip()
    register_secret(api_key)  # redacted from every message even when not from os.environ
    return tinker.ServiceClient(base_url=url, api_key=api_key)
