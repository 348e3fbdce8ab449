"""The server's bookkeeping without HTTP: long-polled futures, cancellation, error categories,
session expiry, sampler eviction, and the response delay option."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from tinker import types

from sdft.serve.app import ServeConfig, create_app, describe_models
from sdft.serve.auth import ApiKey
from sdft.serve.errors import ServeError
from sdft.serve.futures import FutureStore, Payload, UnknownFutureError
from sdft.serve.sessions import ServerState
from serve_fixture import TINY


def as_json(value: Any) -> Payload:
    return Payload(json={"value": value})


def test_retrieve_long_polls_until_the_result_is_ready() -> None:
    store = FutureStore(poll_s=5.0)
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    request_id = store.add(future, as_json, "session-a")
    threading.Timer(0.3, future.set_result, args=(7,)).start()
    started = time.monotonic()
    payload = asyncio.run(store.retrieve(request_id))
    assert payload == Payload(json={"value": 7})
    assert 0.25 < time.monotonic() - started < 3
    # a client that lost the answer can poll again; retrieved results expire after keep_s
    assert asyncio.run(store.retrieve(request_id)) == payload
    short = FutureStore(poll_s=1.0, keep_s=0.05)
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    done.set_result(1)
    first = short.add(done, as_json, "session-a")
    asyncio.run(short.retrieve(first))
    time.sleep(0.1)
    short.add(done, as_json, "session-a")
    with pytest.raises(UnknownFutureError):
        asyncio.run(short.retrieve(first))


def test_retrieve_answers_try_again_and_keeps_the_request() -> None:
    store = FutureStore(poll_s=0.1)
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    request_id = store.add(future, as_json, "session-a")
    assert asyncio.run(store.retrieve(request_id)).json == {
        "type": "try_again",
        "request_id": request_id,
        "queue_state": "active",
    }
    assert not future.cancelled()
    future.set_result(1)
    assert asyncio.run(store.retrieve(request_id)).json == {"value": 1}


def test_errors_and_cancellation_become_error_payloads() -> None:
    store = FutureStore(poll_s=1.0)
    cases = [
        (ServeError(400, "datum 0: bad"), {"error": "datum 0: bad", "category": "user"}),
        (ValueError("bad value"), {"error": "bad value", "category": "user"}),
        (RuntimeError("boom"), {"error": "boom", "category": "server"}),
        # an exception's text can quote a key: it never reaches the client
        (
            RuntimeError("worker died holding tml-k3y_Secret-99"),
            {"error": "worker died holding [REDACTED]", "category": "server"},
        ),
        (
            ServeError(400, "echoed {'X-API-Key': 'not-a-tml-shape-key'}"),
            {"error": "echoed {'X-API-Key': '[REDACTED]'}", "category": "user"},
        ),
    ]
    for error, expected in cases:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        future.set_exception(error)
        assert asyncio.run(store.retrieve(store.add(future, as_json, "s"))).json == expected
    pending: concurrent.futures.Future[int] = concurrent.futures.Future()
    request_id = store.add(pending, as_json, "s")
    assert store.cancel(request_id)
    assert asyncio.run(store.retrieve(request_id)).json == {
        "error": "the request was cancelled",
        "category": "user",
    }
    before = len(store)
    gone = store.add(concurrent.futures.Future(), as_json, "gone")
    store.drop_owner("gone")
    assert len(store) == before
    with pytest.raises(UnknownFutureError):
        store.cancel(gone)


class FakeClient:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


def test_silent_sessions_expire_with_their_models(tmp_path: Path) -> None:
    state = ServerState(
        None, served_models={TINY: {}}, checkpoint_root=tmp_path, session_timeout_s=0.2
    )
    quiet, busy = state.create_session(), state.create_session()
    state.add_model(quiet, FakeClient("local-quiet"), TINY, f"{quiet}:train:0")
    state.add_model(busy, FakeClient("local-busy"), TINY)
    time.sleep(0.15)
    state.model("local-busy", "get_info")  # any request of a session keeps it alive
    time.sleep(0.1)
    assert state.expire_sessions() == [quiet]
    for model_id in ("local-quiet", f"{quiet}:train:0"):
        with pytest.raises(ServeError, match=rf"^get_info: unknown model_id '{model_id}'$"):
            state.model(model_id, "get_info")
    assert state.model("local-busy", "get_info").session_id == busy
    with pytest.raises(ServeError, match=r"expired after 0.2 s without a heartbeat"):
        state.session(quiet, "session_heartbeat")


def test_old_samplers_are_released_with_a_clear_message(tmp_path: Path) -> None:
    state = ServerState(
        None, served_models={TINY: {}}, checkpoint_root=tmp_path, max_samplers_per_session=2
    )
    session = state.create_session()
    for seq in range(3):
        state.add_sampler(session, f"{session}:sample:{seq}", object())
    state.sampler(f"{session}:sample:2", "asample")
    with pytest.raises(ServeError) as info:
        state.sampler(f"{session}:sample:0", "asample")
    assert info.value.status == 404
    assert info.value.message == (
        f"asample: sampling session '{session}:sample:0' was released (the server keeps the 2 "
        "most recent samplers per session)"
    )
    state.finish_session(session)
    with pytest.raises(ServeError, match="its session finished"):
        state.sampler(f"{session}:sample:2", "asample")


def test_latency_option_delays_every_response(tmp_path: Path, local_service: Any) -> None:
    config = ServeConfig(
        models=[TINY],
        api_key=ApiKey("tml-latency-test-1", "--api-key"),
        checkpoint_root=tmp_path,
        latency_ms=300,
        served=describe_models([TINY]),
    )
    client = TestClient(create_app(config, service=local_service))  # no lifespan: shared service
    started = time.monotonic()
    response = client.get("/api/v1/healthz", headers={"X-API-Key": "tml-latency-test-1"})
    assert response.json() == {"status": "ok"}
    assert time.monotonic() - started >= 0.3
    capabilities = client.get(
        "/api/v1/get_server_capabilities", headers={"X-API-Key": "tml-latency-test-1"}
    ).json()
    assert types.GetServerCapabilitiesResponse.model_validate(capabilities).supported_models == [
        types.SupportedModel(
            model_name=TINY, max_context_length=1024, trainable=True, sampleable=True
        )
    ]


class RaisingService:
    """A backend whose calls raise at once (instead of returning a failed future)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def create_lora_training_client(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "status", "detail"),
    [
        (ValueError("rank is too large"), 400, "create_model: rank is too large"),
        (RuntimeError("boom"), 500, "create_model: internal server error: RuntimeError: boom"),
    ],
)
def test_backend_exceptions_become_statuses_and_the_server_keeps_serving(
    tmp_path: Path, error: Exception, status: int, detail: str
) -> None:
    config = ServeConfig(
        models=[TINY],
        api_key=ApiKey("tml-raising-test-1", "--api-key"),
        checkpoint_root=tmp_path,
        served={TINY: {"path": "unused", "max_context_length": 1024}},
    )
    client = TestClient(create_app(config, service=RaisingService(error)))
    headers = {"X-API-Key": "tml-raising-test-1"}
    session = client.post(
        "/api/v1/create_session",
        json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"},
        headers=headers,
    ).json()["session_id"]
    request = {"session_id": session, "model_seq_id": 0, "base_model": TINY,
               "lora_config": {"rank": 4}}  # fmt: skip
    response = client.post("/api/v1/create_model", json=request, headers=headers)
    assert (response.status_code, response.json()) == (status, {"detail": detail})
    assert client.get("/api/v1/healthz", headers=headers).json() == {"status": "ok"}


def test_error_bodies_of_failed_handlers_never_show_a_key() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from sdft.redact import register_secret
    from sdft.serve.app import _guarded

    register_secret("plain-secret-4242")  # a key given as --api-key is registered the same way

    async def crashes(request: Any) -> Any:
        raise RuntimeError("backend died near tml-abc123XYZ and plain-secret-4242")

    async def rejects(request: Any) -> Any:
        raise ValueError("bad header X-API-Key: tml-zzz999")

    async def refuses(request: Any) -> Any:
        raise ServeError(404, "no model for tml-abcdef123")

    app = Starlette(
        routes=[
            Route(f"/api/v1/{handler.__name__}", _guarded(handler), methods=["POST"])
            for handler in (crashes, rejects, refuses)
        ]
    )
    client = TestClient(app, raise_server_exceptions=False)
    answers = {name: client.post(f"/api/v1/{name}") for name in ("crashes", "rejects", "refuses")}
    assert {name: (r.status_code, r.json()) for name, r in answers.items()} == {
        "crashes": (
            500,
            {
                "detail": "crashes: internal server error: RuntimeError: backend died near "
                "[REDACTED] and [REDACTED]"
            },
        ),
        "rejects": (400, {"detail": "rejects: bad header X-API-Key: [REDACTED]"}),
        "refuses": (404, {"detail": "no model for [REDACTED]"}),
    }
