"""Errors of the local backend, shaped like the Tinker service's.

Each is a real ``tinker`` status error (so ``except tinker.TinkerError`` / ``except
tinker.BadRequestError`` work as against the service) and also a standard Python exception
(``ValueError`` / ``FileNotFoundError`` / ``FileExistsError``), since callers such as the cookbook
catch ``(tinker.TinkerError, ValueError)``.
"""

from __future__ import annotations

from typing import Any

import httpx
import tinker


def _response(status: int, message: str) -> httpx.Response:
    request = httpx.Request("POST", "local://sdft-local-backend")
    return httpx.Response(status, request=request, json={"detail": message})


class LocalBadRequestError(tinker.BadRequestError, ValueError):
    """HTTP-400-like: the request is invalid (bad datum, bad sampling parameters, ...)."""

    def __init__(self, message: str) -> None:
        tinker.BadRequestError.__init__(
            self, message, response=_response(400, message), body={"detail": message}
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class CheckpointNotFoundError(tinker.NotFoundError, FileNotFoundError):
    """HTTP-404-like: no checkpoint at that path."""

    def __init__(self, message: str) -> None:
        tinker.NotFoundError.__init__(
            self, message, response=_response(404, message), body={"detail": message}
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class CheckpointExistsError(tinker.ConflictError, FileExistsError):
    """HTTP-409-like: a checkpoint with that name exists and ``overwrite`` was not given."""

    def __init__(self, message: str) -> None:
        tinker.ConflictError.__init__(
            self, message, response=_response(409, message), body={"detail": message}
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class CorruptCheckpointError(tinker.UnprocessableEntityError, ValueError):
    """HTTP-422-like: the checkpoint exists but cannot be read (truncated, edited, mismatched)."""

    def __init__(self, message: str) -> None:
        tinker.UnprocessableEntityError.__init__(
            self, message, response=_response(422, message), body={"detail": message}
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))
