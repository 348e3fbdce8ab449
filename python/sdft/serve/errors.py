"""Errors the server answers, in the shape the SDK surfaces to its user.

A request the server rejects gets an HTTP status and ``{"detail": message}``; the SDK raises the
matching ``tinker`` status error (``BadRequestError`` for 400, ``NotFoundError`` for 404, ...)
whose text carries the message. A request that fails while it runs answers its
``retrieve_future`` with ``{"error": message, "category": "user" | "server"}``, which the SDK
raises as ``tinker.RequestFailedError``. Never 5xx for a bad request: the SDK retries those.
Both exits (``app._error`` and ``FutureStore``'s payloads) pass every message through
:func:`sdft.redact.redact`: an exception's text can quote a key.
"""

from __future__ import annotations

import tinker

from sdft.models import ModelNotFoundError


class ServeError(Exception):
    """A request the server refuses: ``status`` and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(error: BaseException) -> int:
    """The HTTP status for an error raised by the local backend or by request decoding."""
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, tinker.APIStatusError):
        return int(error.status_code)
    if isinstance(error, ModelNotFoundError):
        return 404
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return 400
    return 500


def message_of(error: BaseException) -> str:
    """The error's message for the client, not yet redacted (both exits redact it)."""
    if isinstance(error, (ServeError, tinker.APIStatusError)):
        return str(error.message)
    text = str(error)
    return text if text else type(error).__name__


def category_of(error: BaseException) -> str:
    """``user`` for errors of the request (4xx), ``server`` for the rest."""
    return "user" if 400 <= status_of(error) < 500 else "server"
