"""Pending results, retrieved by ``retrieve_future``.

Every request that the SDK treats as a future (``create_model``, ``forward_backward``,
``optim_step``, ``asample``, ...) is registered here with the local backend's
``concurrent.futures.Future`` and an encoder for its result. ``retrieve_future`` long-polls: it
waits up to ``poll_s`` seconds for the result (no busy-wait) and otherwise answers ``try_again``,
which the SDK re-polls at once. A result stays retrievable for ``keep_s`` seconds after it was
first retrieved (so a client that lost the answer to a dropped connection can poll again), and an
unretrieved one for ``ttl_s`` seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdft.redact import redact
from sdft.serve.errors import category_of, message_of

Encoder = Callable[[Any], "Payload"]


@dataclass(frozen=True)
class Payload:
    """An encoded result: ``json`` (a dict) or ``proto`` bytes."""

    json: dict[str, Any] | None = None
    proto: bytes | None = None


@dataclass
class _Entry:
    future: concurrent.futures.Future[Any]
    encode: Encoder
    owner: str
    created: float = field(default_factory=time.monotonic)
    retrieved: float | None = None


class UnknownFutureError(KeyError):
    pass


class FutureStore:
    """Request id -> pending result."""

    def __init__(
        self, *, poll_s: float = 20.0, ttl_s: float = 3600.0, keep_s: float = 60.0
    ) -> None:
        self.poll_s = poll_s
        self.ttl_s = ttl_s
        self.keep_s = keep_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]

    def add(self, future: concurrent.futures.Future[Any], encode: Encoder, owner: str) -> str:
        """Register ``future``; returns the request id the SDK polls."""
        request_id = f"req-{self._prefix}-{next(self._counter)}"
        with self._lock:
            self._expire()
            self._entries[request_id] = _Entry(future, encode, owner)
        return request_id

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id in [
            k
            for k, e in self._entries.items()
            if e.created < now - self.ttl_s
            or (e.retrieved is not None and e.retrieved < now - self.keep_s)
        ]:
            del self._entries[request_id]

    def _entry(self, request_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(request_id)
        if entry is None:
            raise UnknownFutureError(request_id)
        return entry

    async def retrieve(self, request_id: str) -> Payload:
        """The result, an error payload, or ``try_again`` after ``poll_s`` seconds."""
        entry = self._entry(request_id)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), self.poll_s)
        except TimeoutError:
            return Payload(
                json={"type": "try_again", "request_id": request_id, "queue_state": "active"}
            )
        except (asyncio.CancelledError, Exception):
            if not entry.future.done():
                raise
        payload = self._payload(entry)
        with self._lock:
            if entry.retrieved is None:
                entry.retrieved = time.monotonic()
        return payload

    @staticmethod
    def _payload(entry: _Entry) -> Payload:
        if entry.future.cancelled():
            return Payload(json={"error": "the request was cancelled", "category": "user"})
        error = entry.future.exception()
        if error is not None:
            return Payload(
                json={"error": redact(message_of(error)), "category": category_of(error)}
            )
        try:
            return entry.encode(entry.future.result())
        except Exception as exc:  # an encoder bug must not take the server down
            return Payload(
                json={
                    "error": redact(f"cannot encode the result: {message_of(exc)}"),
                    "category": "server",
                }
            )

    def cancel(self, request_id: str) -> bool:
        """Cancel a request that has not started; True when it was cancelled."""
        entry = self._entry(request_id)
        return entry.future.cancel()

    def drop_owner(self, owner: str) -> None:
        """Forget every result of ``owner`` (a finished session)."""
        with self._lock:
            for request_id in [k for k, e in self._entries.items() if e.owner == owner]:
                del self._entries[request_id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
