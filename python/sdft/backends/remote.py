"""The real Tinker service, with fast failure where the SDK alone would block or be vague.

``tinker.ServiceClient`` does no I/O when constructed; its first ``create_*`` call fails at once
without a credential but blocks for about six minutes (layered retries) when the service cannot be
reached. :func:`create_service_client` therefore checks, before building the client, that the SDK
will find a credential and that the host of the base URL accepts a TCP connection within a few
seconds. A credential is what the SDK itself accepts (``tinker/lib/internal_client_holder.py`` and
``_auth_token_provider.py``), in its order: ``TINKER_API_KEY``, then ``TINKER_CREDENTIAL_CMD`` (a
command printing a credential), then the default key stored by ``tinker auth login``
(``~/.tinker/credentials.json``). Errors during a run (rate limits, 5xx, dropped connections) are
left to the SDK's own retries. No credential is ever printed or logged.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

API_KEY_ENV = "TINKER_API_KEY"
CREDENTIAL_CMD_ENV = "TINKER_CREDENTIAL_CMD"
BASE_URL_ENV = "TINKER_BASE_URL"
DEFAULT_PROBE_TIMEOUT_S = 5.0


class TinkerUnavailableError(ConnectionError):
    """The Tinker service cannot be used: no API key, or the base URL cannot be reached."""


def resolve_base_url(base_url: str | None, env: Mapping[str, str] | None = None) -> str:
    """The URL the SDK will talk to: ``base_url``, else ``$TINKER_BASE_URL``, else production."""
    from tinker.lib.base_url import DEFAULT_BASE_URL

    env = os.environ if env is None else env
    return (base_url or env.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def stored_api_key(path: Path | None = None) -> str | None:
    """The default key stored by ``tinker auth login`` (``~/.tinker/credentials.json``), or None.

    An unreadable file counts as none (the SDK would fail on it later with its own message)."""
    from tinker.lib.credentials import JsonCredentialStore, default_credentials_path

    try:
        record = JsonCredentialStore(path or default_credentials_path()).get_default_key()
    except Exception:
        return None
    return record.key.strip() if record is not None and record.key.strip() else None


def credential_source(
    env: Mapping[str, str] | None = None, credentials_path: Path | None = None
) -> str | None:
    """Where the SDK will take its credential from (``TINKER_API_KEY``,
    ``TINKER_CREDENTIAL_CMD`` or the stored key), or None when there is none. Never the value."""
    env = os.environ if env is None else env
    if env.get(API_KEY_ENV, "").strip():
        return API_KEY_ENV
    if env.get(CREDENTIAL_CMD_ENV, "").strip():
        return CREDENTIAL_CMD_ENV
    if stored_api_key(credentials_path) is not None:
        return "the key stored by `tinker auth login`"
    return None


def check_api_key(
    env: Mapping[str, str] | None = None, credentials_path: Path | None = None
) -> str:
    """The credential's source (see :func:`credential_source`); raises
    :class:`TinkerUnavailableError` naming every accepted source when there is none."""
    source = credential_source(env, credentials_path)
    if source is None:
        raise TinkerUnavailableError(
            f"{API_KEY_ENV} is not set: backend.kind: tinker needs a Tinker credential (export "
            f"{API_KEY_ENV}=..., set {CREDENTIAL_CMD_ENV} to a command that prints one, or run "
            "`tinker auth login`; or use backend.kind: local to train offline)"
        )
    return source


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
    credentials_path: Path | None = None,
):
    """A ``tinker.ServiceClient`` for ``base_url``, after checking the credential and
    reachability. ``TINKER_API_KEY`` and a stored key are passed to the SDK explicitly; a
    ``TINKER_CREDENTIAL_CMD`` is run by the SDK itself (from ``os.environ``)."""
    env = os.environ if env is None else env
    source = check_api_key(env, credentials_path)
    url = resolve_base_url(base_url, env)
    probe(url, timeout=probe_timeout)
    import tinker

    from sdft.redact import register_secret

    api_key: str | None = None
    if source == API_KEY_ENV:
        api_key = env[API_KEY_ENV].strip()
    elif source != CREDENTIAL_CMD_ENV:
        api_key = stored_api_key(credentials_path)
    register_secret(api_key)  # redacted from every message even when not from os.environ
    return tinker.ServiceClient(base_url=url, api_key=api_key)
