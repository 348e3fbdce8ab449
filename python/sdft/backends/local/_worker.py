"""One worker thread per model: requests run strictly in submission order.

Futures are ``tinker``'s own ``AwaitableConcurrentFuture`` over a ``concurrent.futures.Future``:
``.result(timeout)`` from any thread, ``await`` / ``.result_async()`` / ``.coroutine()`` from any
event loop, ``.future()`` for the raw future.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from sdft.backends.local._memory import trim_free_memory

T = TypeVar("T")


def done_future(value: T) -> AwaitableConcurrentFuture[T]:
    """A future that already holds ``value``."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


def failed_future(error: BaseException) -> AwaitableConcurrentFuture[Any]:
    """A future that raises ``error`` on ``.result()`` / ``await`` (as a service-side rejection)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_exception(error)
    return AwaitableConcurrentFuture(future)


class SerialWorker:
    """A single thread that runs submitted callables one at a time, first in, first out."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sdft-{name}"
        )
        self._thread_ident: int | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(
        self, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> AwaitableConcurrentFuture[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"worker {self.name} is closed (the service client was closed)")
            future = self._executor.submit(self._run, fn, args, kwargs)
        return AwaitableConcurrentFuture(future)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        self._thread_ident = threading.get_ident()
        try:
            return fn(*args, **kwargs)
        finally:
            trim_free_memory()

    def in_worker_thread(self) -> bool:
        """True when called from this worker's own thread (to run nested work inline)."""
        return self._thread_ident == threading.get_ident()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
