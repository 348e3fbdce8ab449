"""Secret redaction for every message that leaves the program.

Error bodies from an HTTP server may echo the request headers (``{'X-API-Key': 'tml-...'}``), and
exceptions carry those bodies into their messages. :func:`redact` removes, from any text:

* the values of the secret environment variables (:data:`SECRET_ENV_VARS`) and of any secret
  registered at run time with :func:`register_secret` (a key fetched by a credential command);
* anything shaped like a Tinker key (``tml-`` followed by key characters);
* the value of an ``X-API-Key`` or ``Authorization`` header (``Bearer``/``Basic`` scheme kept),
  in the forms ``Header: value``, ``'Header': 'value'`` and ``header=value``.

The CLI's error output, ``summary.md`` and log records (:func:`install_log_redaction`) pass
through it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

#: Environment variables whose values are secrets.
SECRET_ENV_VARS = ("TINKER_API_KEY", "SDFT_SERVE_API_KEY")
REDACTED = "[REDACTED]"

# Shorter values are not treated as secrets: replacing every "a" in a message helps no one.
_MIN_SECRET_LENGTH = 6

_TINKER_KEY = re.compile(r"tml-[A-Za-z0-9_\-]+")
_HEADER_VALUE = re.compile(
    r"""(?P<head>(?P<quote>['"]?)(?:x-api-key|authorization)(?P=quote)\s*[:=]\s*['"]?)"""
    r"""(?P<scheme>(?:bearer|basic|token)\s+)?+"""
    r"""(?!\[REDACTED\])(?P<value>[^\s'",;}\]]+)""",
    re.IGNORECASE,
)

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact ``value`` from now on (for secrets that are not in the environment)."""
    if value and len(value.strip()) >= _MIN_SECRET_LENGTH:
        with _lock:
            _registered.add(value.strip())


def known_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values to redact: registered ones and those of :data:`SECRET_ENV_VARS`,
    longest first (so a secret containing another is replaced whole)."""
    env = os.environ if env is None else env
    values = {env.get(name, "").strip() for name in SECRET_ENV_VARS}
    with _lock:
        values |= _registered
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, *, extra: Iterable[str] = (), env: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret replaced by ``[REDACTED]`` (see the module docstring)."""
    if not text:
        return text
    for secret in sorted({*known_secrets(env), *(s for s in extra if s)}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _HEADER_VALUE.sub(lambda m: m.group("head") + (m.group("scheme") or "") + REDACTED, text)
    return _TINKER_KEY.sub(REDACTED, text)


def _redact_record(record: logging.LogRecord) -> None:
    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_factory_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process when it is created, whichever logger and handler
    (also those configured later, e.g. by uvicorn) it goes to. Idempotent."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


__all__ = [
    "REDACTED",
    "SECRET_ENV_VARS",
    "RedactingFilter",
    "install_log_redaction",
    "known_secrets",
    "redact",
    "register_secret",
]
