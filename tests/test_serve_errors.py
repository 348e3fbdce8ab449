"""``sdft serve`` under bad input and without credentials: the status and message the SDK shows,
no work done, the server alive and other clients' state intact afterwards."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tinker
import zstandard
from starlette.testclient import TestClient
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from sdft.serve.app import ServeConfig, create_app, describe_models
from sdft.serve.auth import DEFAULT_API_KEY, ApiKey, check_bind, resolve_api_key
from sdft.serve.cli import main as serve_main
from serve_fixture import TINY, ServeProcess

VOCAB = 49152


def ce_datum(tokens: list[int], targets: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(targets, dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(targets), dtype=np.float32)),
        },
    )


def fb_body(model_id: str, data: list[types.Datum]) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


@pytest.fixture(scope="module")
def http(serve_server: ServeProcess) -> Any:
    with httpx.Client(base_url=serve_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def student(serve_service: Any) -> Any:
    return serve_service.create_lora_training_client(TINY, rank=2, seed=1).result(timeout=300)


def auth(server: ServeProcess) -> dict[str, str]:
    return {"X-API-Key": server.key}


# --- credentials ------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/api/v1/healthz"),
    ("POST", "/api/v1/client/config"),
    ("POST", "/api/v1/create_session"),
    ("GET", "/api/v1/get_server_capabilities"),
    ("POST", "/api/v1/create_model"),
    ("POST", "/api/v1/forward_backward"),
    ("POST", "/api/v1/asample"),
    ("POST", "/api/v1/retrieve_future"),
    ("POST", "/api/v1/telemetry"),
    ("GET", "/api/v1/no_such_endpoint"),
]


@pytest.mark.parametrize("key", [None, "tml-wrong-key-000000", ""])
def test_every_request_without_the_key_gets_401(
    http: httpx.Client, serve_server: ServeProcess, key: str | None
) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    for method, path in ENDPOINTS:
        response = http.request(method, path, headers=headers, content=b"{}")
        assert response.status_code == 401, (method, path)
        assert response.json() == {
            "detail": f"{'wrong' if key else 'missing'} API key: send the server's key in the "
            "X-API-Key header"
        }
        assert serve_server.key not in response.text


def test_a_request_without_the_key_does_no_work(
    http: httpx.Client, serve_server: ServeProcess
) -> None:
    session = http.post("/api/v1/create_session", headers=auth(serve_server), json={
        "tags": [], "user_metadata": {}, "sdk_version": tinker.__version__,
    }).json()["session_id"]  # fmt: skip
    request = {"session_id": session, "model_seq_id": 99, "base_model": TINY,
               "lora_config": {"rank": 2}}  # fmt: skip
    denied = http.post("/api/v1/create_model", json=request, headers={"X-API-Key": "tml-nope1234"})
    assert denied.status_code == 401
    info = http.post(
        "/api/v1/get_info", json={"model_id": f"{session}:train:99"}, headers=auth(serve_server)
    )
    assert info.status_code == 404
    assert info.json()["detail"] == f"get_info: unknown model_id '{session}:train:99'"


def test_the_sdk_with_a_wrong_key_fails_fast_with_401(serve_server: ServeProcess) -> None:
    started = time.monotonic()
    service = tinker.ServiceClient(base_url=serve_server.url, api_key="tml-not-the-key-123")
    with pytest.raises(tinker.AuthenticationError, match="wrong API key"):
        service.create_lora_training_client(TINY, rank=2).result(timeout=60)
    assert time.monotonic() - started < 20


def test_key_resolution_and_bind_rules() -> None:
    assert resolve_api_key(None, {}).is_default
    assert resolve_api_key(None, {"SDFT_SERVE_API_KEY": " tml-from-env-1 "}) == ApiKey(
        "tml-from-env-1", "$SDFT_SERVE_API_KEY"
    )
    assert resolve_api_key("tml-flag-key-1", {"SDFT_SERVE_API_KEY": "tml-x-12345"}).source == (
        "--api-key"
    )
    with pytest.raises(ValueError, match="must start with 'tml-'"):
        resolve_api_key("secret", {})
    assert "tml-flag" not in repr(resolve_api_key("tml-flag-key-1", {}))
    check_bind("127.0.0.1", False, resolve_api_key(None, {}))
    check_bind("::1", True, resolve_api_key(None, {}))
    with pytest.raises(ValueError, match="needs --host given explicitly"):
        check_bind("0.0.0.0", False, ApiKey("tml-strong-key-1", "--api-key"))
    with pytest.raises(ValueError, match="not the public default"):
        check_bind("0.0.0.0", True, resolve_api_key(None, {}))
    check_bind("0.0.0.0", True, ApiKey("tml-strong-key-1", "--api-key"))


def test_cli_refuses_a_public_address_with_the_default_key(capsys: Any) -> None:
    assert serve_main(["--host", "0.0.0.0", "--models", TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdft serve: error: binding the non-loopback address 0.0.0.0 needs")
    assert DEFAULT_API_KEY not in err


# --- bad requests -----------------------------------------------------------------------------


def test_token_id_outside_the_vocabulary_is_a_400_the_sdk_shows(student: Any) -> None:
    good = [ce_datum([5, 6, 7], [6, 7, 8]), ce_datum([9, 10], [10, 11])]
    before = student.forward(good, "cross_entropy").result(timeout=120)
    bad = [*good, ce_datum([5, 6, 7], [6, 70000, 8])]
    with pytest.raises(tinker.BadRequestError) as info:
        student.forward_backward(bad, "cross_entropy").result(timeout=120)
    assert info.value.status_code == 400
    message = info.value.body["detail"]  # type: ignore[index]
    assert message == (
        "forward_backward: datum 2: target_tokens[1] = 70000 is outside the vocabulary [0, 49152)"
    )
    assert message in str(info.value)
    after = student.forward(good, "cross_entropy").result(timeout=120)
    assert after.metrics["loss:sum"] == before.metrics["loss:sum"]


def test_malformed_bodies_are_400s(
    http: httpx.Client, serve_server: ServeProcess, student: Any
) -> None:
    proto = {**auth(serve_server), "Content-Type": "application/x-protobuf"}
    garbage = http.post("/api/v1/forward_backward", content=b"\xff\x00garbage", headers=proto)
    assert garbage.status_code == 400
    assert garbage.json()["detail"].startswith(
        "forward_backward: body is not a ForwardBackwardRequest protobuf"
    )
    as_json = http.post("/api/v1/forward_backward", json={}, headers=auth(serve_server))
    assert as_json.status_code == 415
    not_json = http.post("/api/v1/optim_step", content=b"{not json", headers=auth(serve_server))
    assert not_json.status_code == 400
    assert not_json.json()["detail"].startswith("optim_step: body is not valid JSON")
    extra = http.post(
        "/api/v1/get_info",
        json={"model_id": student.model_id, "surprise": 1},
        headers=auth(serve_server),
    )
    assert extra.status_code == 400
    assert (
        extra.json()["detail"]
        == "get_info: invalid request: surprise: Extra inputs are not permitted"
    )


def test_unknown_ids_are_404s(http: httpx.Client, serve_server: ServeProcess) -> None:
    unknown = fb_body("nobody", [ce_datum([1, 2], [2, 3])])
    headers = {**auth(serve_server), "Content-Type": "application/x-protobuf"}
    response = http.post("/api/v1/forward_backward", content=unknown, headers=headers)
    assert (response.status_code, response.json()["detail"]) == (
        404,
        "forward_backward: unknown model_id 'nobody'",
    )
    future = http.post(
        "/api/v1/retrieve_future", json={"request_id": "req-x-1"}, headers=auth(serve_server)
    )
    assert future.status_code == 404
    assert future.json()["detail"].startswith("retrieve_future: unknown request id 'req-x-1'")
    missing = http.get("/api/v1/billing/usage/events", headers=auth(serve_server))
    assert missing.status_code == 404
    assert missing.json()["detail"].startswith("sdft serve does not implement GET")


def test_shape_mismatches_are_400s(
    http: httpx.Client, serve_server: ServeProcess, student: Any
) -> None:
    message = pb.ForwardBackwardRequest(
        model_id=student.model_id, seq_id=1, loss_fn="cross_entropy"
    )
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], np.int32).tobytes()
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], dense=np.array([2, 3], np.int64).tobytes())
    )
    headers = {**auth(serve_server), "Content-Type": "application/x-protobuf"}
    response = http.post(
        "/api/v1/forward_backward", content=message.SerializeToString(), headers=headers
    )
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "forward_backward: datum 0: loss_fn_inputs['target_tokens']: shape [3] needs 3 values, "
        "got 2"
    )
    short = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array([2, 3], np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(2, np.float32)),
        },
    )
    with pytest.raises(tinker.BadRequestError, match="forward_backward: datum 0"):
        student.forward_backward([short], "cross_entropy").result(timeout=60)


def test_zstd_bodies_are_accepted(
    http: httpx.Client, serve_server: ServeProcess, student: Any
) -> None:
    data = [ce_datum([5, 6, 7], [6, 7, 8])]
    headers = {
        **auth(serve_server),
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "zstd",
    }
    body = zstandard.ZstdCompressor().compress(fb_body(student.model_id, data))
    accepted = http.post("/api/v1/forward", content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    request_id = accepted.json()["request_id"]
    result = http.post(
        "/api/v1/retrieve_future",
        json={"request_id": request_id},
        headers={**auth(serve_server), "Accept": "application/x-protobuf"},
    )
    assert result.headers["content-type"] == "application/x-protobuf"
    output = pb.ForwardBackwardOutput.FromString(result.content)
    expected = student.forward(data, "cross_entropy").result(timeout=60)
    assert output.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"])
    broken = http.post("/api/v1/forward", content=b"not zstd", headers=headers)
    assert broken.status_code == 400
    assert broken.json()["detail"].startswith("forward_backward: body is not valid zstd")


# --- checkpoint paths -------------------------------------------------------------------------


def test_checkpoint_names_cannot_escape_the_root(
    http: httpx.Client, serve_server: ServeProcess, serve_service: Any, student: Any
) -> None:
    for name in ["../escape", "a/b", ".hidden", "", "x" * 201]:
        with pytest.raises(tinker.BadRequestError, match="checkpoint name must be"):
            student.save_state(name).result(timeout=60)
    session = serve_service.holder.get_session_id()
    for path in [
        "tinker://../weights/x",
        "tinker://run/weights/../../x",
        "tinker://run/other/x",
        "/etc/passwd",
        "local://run/weights/x",
    ]:
        response = http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": 1000, "model_path": path},
            headers=auth(serve_server),
        )
        assert response.status_code == 400, path
        assert "checkpoint path" in response.json()["detail"], path
        loaded = http.post(
            "/api/v1/load_weights",
            json={"model_id": student.model_id, "path": path, "optimizer": False},
            headers=auth(serve_server),
        )
        assert loaded.status_code == 400, path
    escaped = [p for p in serve_server.checkpoint_root.parent.iterdir() if p.name == "escape"]
    assert escaped == []
    missing = http.post(
        "/api/v1/weights_info",
        json={"tinker_path": "tinker://nobody/weights/none"},
        headers=auth(serve_server),
    )
    assert (missing.status_code, missing.json()["detail"]) == (
        404,
        "weights_info: no checkpoint at tinker://nobody/weights/none",
    )


# --- transport --------------------------------------------------------------------------------


def _raw(server: ServeProcess, request: bytes, *, read: bool = True) -> bytes:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        if not read:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_declared_oversized_body_is_413_before_reading_it(serve_server: ServeProcess) -> None:
    head = (
        "POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"X-API-Key: {serve_server.key}\r\nContent-Type: application/x-protobuf\r\n"
        "Content-Length: 999999999999\r\n\r\n"
    ).encode()
    reply = _raw(serve_server, head)
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"exceeds the limit of" in reply


def test_a_client_disconnecting_mid_request_does_not_hurt_the_server(
    http: httpx.Client, serve_server: ServeProcess, student: Any
) -> None:
    body = fb_body(student.model_id, [ce_datum([5, 6, 7], [6, 7, 8])])
    head = (
        "POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\n"
        f"X-API-Key: {serve_server.key}\r\nContent-Type: application/x-protobuf\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(3):
        _raw(serve_server, head + body[: len(body) // 2], read=False)
    time.sleep(0.5)
    assert serve_server.process.poll() is None
    assert http.get("/api/v1/healthz", headers=auth(serve_server)).json() == {"status": "ok"}
    out = student.forward([ce_datum([5, 6, 7], [6, 7, 8])], "cross_entropy").result(timeout=60)
    assert np.isfinite(out.metrics["loss:sum"])


def test_configurable_body_limit(tmp_path: Path, local_service: Any) -> None:
    config = ServeConfig(
        models=[TINY],
        api_key=ApiKey("tml-limit-test-1", "--api-key"),
        checkpoint_root=tmp_path,
        max_body_bytes=1000,
        served=describe_models([TINY]),
    )
    client = TestClient(create_app(config, service=local_service))  # no lifespan: shared service
    headers = {"X-API-Key": "tml-limit-test-1"}
    big = client.post("/api/v1/telemetry", content=b"x" * 1001, headers=headers)
    assert big.status_code == 413
    assert big.json() == {"detail": "telemetry: body of 1001 bytes exceeds the limit of 1000"}
    ok = client.post("/api/v1/telemetry", content=json.dumps({"events": []}), headers=headers)
    assert ok.json() == {"status": "accepted"}
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
    response = client.post(
        "/api/v1/forward_backward",
        content=bomb,
        headers={**headers, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert response.status_code == 413
    assert "decompressed body exceeds" in response.json()["detail"]
