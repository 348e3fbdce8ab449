"""What the server holds: client sessions, their training models and sampling sessions, on one
local backend (``LocalServiceClient``).

Wire ids: a training model is known by the local client's own id (``local-...``, also the run id
in its ``tinker://`` checkpoint paths) and by ``<session_id>:train:<model_seq_id>`` (the id the SDK
derives itself when it creates a model through ``load_weights``). Sampling sessions are
``<session_id>:sample:<seq>``. A session that sends nothing (no heartbeat, no request) for
``session_timeout_s`` is dropped with everything it created, so a killed client frees its models.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sdft.serve.errors import ServeError

T = TypeVar("T")
U = TypeVar("U")


def then(
    future: concurrent.futures.Future[T], transform: Callable[[T], U]
) -> concurrent.futures.Future[U]:
    """A future of ``transform(result)`` (errors and cancellation pass through)."""
    out: concurrent.futures.Future[U] = concurrent.futures.Future()

    def done(source: concurrent.futures.Future[T]) -> None:
        if source.cancelled():
            out.cancel()
            out.set_running_or_notify_cancel()
            return
        error = source.exception()
        if error is not None:
            out.set_exception(error)
            return
        try:
            out.set_result(transform(source.result()))
        except BaseException as exc:
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


@dataclass
class TrainingModel:
    model_id: str
    client: Any  # LocalTrainingClient
    session_id: str
    base_model: str
    aliases: set[str] = field(default_factory=set)


@dataclass
class Session:
    session_id: str
    last_seen: float = field(default_factory=time.monotonic)
    models: set[str] = field(default_factory=set)
    samplers: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    joined: int = 0


class ServerState:
    """Sessions, models and samplers, guarded by one lock (handlers and backend threads)."""

    def __init__(
        self,
        service: Any,
        *,
        served_models: dict[str, dict[str, Any]],
        checkpoint_root: Path,
        max_samplers_per_session: int = 16,
        session_timeout_s: float = 300.0,
    ) -> None:
        self.service = service
        self.served_models = served_models
        self.checkpoint_root = checkpoint_root
        self.max_samplers_per_session = max_samplers_per_session
        self.session_timeout_s = session_timeout_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, TrainingModel] = {}
        self._released: dict[str, str] = {}

    # --- sessions ---------------------------------------------------------------------------

    def create_session(self) -> str:
        session_id = f"session-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._sessions[session_id] = Session(session_id)
        return session_id

    def session(self, session_id: str, where: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise ServeError(
                    404,
                    f"{where}: unknown session {session_id!r} (finished, expired after "
                    f"{self.session_timeout_s:g} s without a heartbeat, or created before a "
                    "server restart)",
                )
            session.last_seen = time.monotonic()
            return session

    def finish_session(self, session_id: str) -> list[str]:
        """Drop a session and everything it created; returns the dropped model ids."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return []
            for model_id in session.models:
                model = self._models.pop(model_id, None)
                for alias in model.aliases if model else ():
                    self._models.pop(alias, None)
            for sampler_id in session.samplers:
                self._released[sampler_id] = "its session finished"
            return sorted(session.models)

    def expire_sessions(self) -> list[str]:
        """Finish every session silent for longer than ``session_timeout_s``."""
        cutoff = time.monotonic() - self.session_timeout_s
        with self._lock:
            stale = [s.session_id for s in self._sessions.values() if s.last_seen < cutoff]
        for session_id in stale:
            self.finish_session(session_id)
        return stale

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # --- base models ------------------------------------------------------------------------

    def check_served(self, base_model: str | None, where: str) -> str:
        if not base_model or base_model not in self.served_models:
            raise ServeError(
                400,
                f"{where}: base model {base_model!r} is not served here; served models: "
                f"{', '.join(sorted(self.served_models))}",
            )
        return base_model

    # --- training models ----------------------------------------------------------------------

    def add_model(
        self, session_id: str, client: Any, base_model: str, *aliases: str
    ) -> TrainingModel:
        model = TrainingModel(
            model_id=client.model_id,
            client=client,
            session_id=session_id,
            base_model=base_model,
            aliases=set(aliases),
        )
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise ServeError(404, f"session {session_id!r} ended while its model was created")
            session.models.add(model.model_id)
            for key in (model.model_id, *aliases):
                self._models[key] = model
        return model

    def model(self, model_id: str, where: str) -> TrainingModel:
        with self._lock:
            model = self._models.get(model_id)
            if model is not None and model.session_id in self._sessions:
                self._sessions[model.session_id].last_seen = time.monotonic()
        if model is None:
            raise ServeError(404, f"{where}: unknown model_id {model_id!r}")
        return model

    # --- sampling sessions --------------------------------------------------------------------

    def add_sampler(self, session_id: str, sampler_id: str, sampler: Any) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise ServeError(404, f"session {session_id!r} ended while its sampler was created")
            session.samplers[sampler_id] = sampler
            while len(session.samplers) > self.max_samplers_per_session:
                evicted, _ = session.samplers.popitem(last=False)
                self._released[evicted] = (
                    f"the server keeps the {self.max_samplers_per_session} most recent samplers "
                    "per session"
                )

    def sampler(self, sampling_session_id: str, where: str) -> Any:
        session_id = sampling_session_id.split(":", 1)[0]
        with self._lock:
            session = self._sessions.get(session_id)
            sampler = session.samplers.get(sampling_session_id) if session else None
            if sampler is not None and session is not None:
                session.samplers.move_to_end(sampling_session_id)
                session.last_seen = time.monotonic()
                return sampler
            reason = self._released.get(sampling_session_id)
        if reason:
            raise ServeError(
                404, f"{where}: sampling session {sampling_session_id!r} was released ({reason})"
            )
        raise ServeError(404, f"{where}: unknown sampling session {sampling_session_id!r}")

    def join(self, sampling_session_id: str, where: str) -> int:
        self.sampler(sampling_session_id, where)
        session = self.session(sampling_session_id.split(":", 1)[0], where)
        with self._lock:
            session.joined += 1
            return session.joined
