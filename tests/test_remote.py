"""The Tinker backend: fast, clear failures (no key, unreachable service), and requests that are
exactly the ones the local backend executes, serialized through the SDK's own conversion."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types
from tinker._compat import model_dump
from tinker.proto import tinker_public_pb2 as public_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from sdft.backends import remote
from sdft.backends.remote import TinkerUnavailableError, create_service_client, probe
from sdft.config import load_config
from sdft.loop import train
from support import Recorder, RecordingService, RecordingTrainer, local_service, write_config

SECRET = "tml-test-secret-0123456789"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_key_fails_at_once_naming_the_variable() -> None:
    started = time.monotonic()
    with pytest.raises(TinkerUnavailableError, match=r"^TINKER_API_KEY is not set: backend.kind"):
        create_service_client("http://127.0.0.1:1", env={})
    with pytest.raises(TinkerUnavailableError, match="TINKER_API_KEY is not set"):
        create_service_client(None, env={"TINKER_API_KEY": "   "})
    assert time.monotonic() - started < 0.5


def test_unreachable_base_url_fails_within_seconds() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(TinkerUnavailableError) as info:
        create_service_client(url, env={"TINKER_API_KEY": SECRET})
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith(f"cannot connect to {url}: ")
    assert "refused" in message.lower()
    assert SECRET not in message


def test_unknown_host_and_bad_urls() -> None:
    with pytest.raises(
        TinkerUnavailableError,
        match=r"cannot connect to http://sdft-no-such-host\.invalid: host 'sdft-no-such-host\.invalid' not found",
    ):
        probe("http://sdft-no-such-host.invalid", timeout=3)
    with pytest.raises(TinkerUnavailableError, match="cannot connect to ftp://x: not an http"):
        probe("ftp://x")


def test_dns_lookup_and_connect_are_bounded_by_the_timeout(monkeypatch) -> None:
    def slow_lookup(*args, **kwargs):
        time.sleep(3)
        return []

    monkeypatch.setattr(remote.socket, "getaddrinfo", slow_lookup)
    started = time.monotonic()
    with pytest.raises(
        TinkerUnavailableError,
        match=r"cannot connect to http://example\.test: DNS lookup of example\.test took longer than 0\.2 s",
    ):
        probe("http://example.test", timeout=0.2)
    assert time.monotonic() - started < 1.5


def test_connect_timeout_message(monkeypatch) -> None:
    def never_answers(self, address):
        raise TimeoutError("timed out")

    monkeypatch.setattr(remote.socket.socket, "connect", never_answers)
    with pytest.raises(
        TinkerUnavailableError,
        match=r"cannot connect to http://127\.0\.0\.1:9: no answer from 127\.0\.0\.1:9 within 0\.5 s",
    ):
        probe("http://127.0.0.1:9", timeout=0.5)


def test_reachable_service_gives_a_real_service_client_without_io() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        client = create_service_client(url, env={"TINKER_API_KEY": SECRET})
    assert isinstance(client, tinker.ServiceClient)
    assert client._base_url == url.rstrip("/")
    assert client._api_key == SECRET


def test_base_url_resolution_order() -> None:
    from tinker.lib.base_url import DEFAULT_BASE_URL

    assert (
        remote.resolve_base_url("http://a:1/", env={"TINKER_BASE_URL": "http://b:2"})
        == "http://a:1"
    )
    assert remote.resolve_base_url(None, env={"TINKER_BASE_URL": "http://b:2"}) == "http://b:2"
    assert remote.resolve_base_url(None, env={}) == DEFAULT_BASE_URL


def test_cli_train_on_tinker_without_key_is_one_clear_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from sdft.cli import main

    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "golden_answer": "a"}\n')
    (tmp_path / "config.yaml").write_text(
        "model: {name: Qwen/Qwen3-4B-Instruct-2507}\n"
        "backend: {kind: tinker, base_url: 'http://127.0.0.1:1'}\n"
        "data: {path: train.jsonl}\noutput_dir: out\n"
    )
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdft: error: TINKER_API_KEY is not set")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --- the Tinker backend sends exactly what the local backend executes --------------------------


WIRE_DTYPES = {public_pb.DTYPE_FLOAT32: np.float32, public_pb.DTYPE_INT64: np.int64}


def to_wire(data: list[types.Datum], loss_fn: str) -> bytes:
    """The bytes ``TrainingClient.forward_backward`` posts, built by the SDK's own conversion."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
        model_id="sdft-test:train:0",
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def decode_tensor(tensor: public_pb.Tensor) -> np.ndarray:
    dtype = WIRE_DTYPES[tensor.dtype]
    shape = list(tensor.shape)
    if tensor.HasField("sparse_csr"):
        values = np.frombuffer(tensor.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(tensor.sparse_csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(tensor.sparse_csr.col_indices, dtype=np.int64)
        dense = np.zeros(shape, dtype=dtype)
        for row in range(shape[0]):
            dense[row, cols[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
        return dense
    return np.frombuffer(tensor.dense, dtype=dtype).reshape(shape)


def decode_wire(payload: bytes) -> tuple[str, list[tuple[list[int], dict[str, np.ndarray]]]]:
    message = public_pb.ForwardBackwardRequest.FromString(payload)
    datums = []
    for datum in message.data:
        tokens = [
            int(t)
            for chunk in datum.model_input
            for t in np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32)
        ]
        inputs = {name: decode_tensor(tensor) for name, tensor in datum.loss_fn_inputs.items()}
        datums.append((tokens, inputs))
    return message.loss_fn, datums


class CustomLossProbe(RecordingTrainer):
    """Before each ``forward_backward_custom``, queues a plain ``forward`` of the same datums (the
    SDK's first phase) so the test can replay the SDK's client-side custom-loss computation on the
    very log-probs the local backend trained on."""

    def forward_backward_custom(self, data, loss_fn, **kwargs):
        wire = tinker.TrainingClient._get_custom_loss_forward_data(None, data, "cross_entropy")
        probe_future = self.inner.forward(wire, "cross_entropy")
        future = super().forward_backward_custom(data, loss_fn, **kwargs)
        self.recorder.custom.append((data, loss_fn, probe_future, future))
        return future


class ProbingService(RecordingService):
    def _training(self, method, *args, **kwargs):
        future = super()._training(method, *args, **kwargs)
        future.wrap = lambda client: CustomLossProbe(client, self.recorder)
        return future


LOSS_KEYS = {
    "cross_entropy": {"target_tokens", "weights"},
    "importance_sampling": {"target_tokens", "logprobs", "advantages"},
}


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("sdft", {}),
        ("sdft", {"loss": "reverse_kl"}),
        ("sdft", {"topk": 0}),
        ("sdft", {"lora_rank": 4, "num_substeps": 2}),
        ("sft", {}),
    ],
    ids=["topk_cross_entropy", "reverse_kl", "importance_sampling", "lora_substeps", "sft"],
)
def test_tinker_requests_are_the_datums_the_local_backend_executes(
    tmp_path: Path, kind: str, params: dict
) -> None:
    config = load_config(
        write_config(tmp_path, kind=kind, params={"max_steps": 2, **params}, benchmarks=[])
    )
    recorder = Recorder()
    recorder.custom = []
    train(config, service_client=ProbingService(local_service(config), recorder), progress=False)
    assert recorder.forward_backward

    for data, loss_fn, _ in recorder.forward_backward:
        # A custom loss sends target_tokens + weights with cross_entropy (SDK phase 1).
        wire_loss = "cross_entropy" if loss_fn == "custom" else loss_fn
        wire_data = (
            tinker.TrainingClient._get_custom_loss_forward_data(None, data, "cross_entropy")
            if loss_fn == "custom"
            else data
        )
        sent_loss, sent = decode_wire(to_wire(wire_data, wire_loss))
        assert sent_loss == wire_loss
        assert len(sent) == len(data)
        for datum, (tokens, inputs) in zip(data, sent, strict=True):
            assert "mask" not in datum.loss_fn_inputs and "mask" not in inputs
            assert set(datum.loss_fn_inputs) == set(inputs) == LOSS_KEYS[wire_loss]
            assert tokens == datum.model_input.to_ints()
            for key, array in inputs.items():
                local = datum.loss_fn_inputs[key].to_numpy()
                assert array.dtype == (np.int64 if key == "target_tokens" else np.float32)
                assert array.shape == local.shape == (len(tokens), *local.shape[1:])
                np.testing.assert_array_equal(array, local)

    # Every sampling request is a valid SDK request and survives its JSON wire form unchanged.
    for sample in recorder.samples:
        request = types.SampleRequest(
            num_samples=sample["num_samples"],
            prompt=sample["prompt"],
            sampling_params=sample["sampling_params"],
            prompt_logprobs=sample["include_prompt_logprobs"],
            topk_prompt_logprobs=sample["topk_prompt_logprobs"],
            base_model=config.model.name,
        )
        body = model_dump(request, exclude_unset=False, exclude_none=True, mode="json")
        again = types.SampleRequest.model_validate(body)
        assert again.prompt.to_ints() == sample["prompt"].to_ints()
        assert again.sampling_params == sample["sampling_params"]
        assert again.topk_prompt_logprobs == sample["topk_prompt_logprobs"]

    # The SDK's client-side custom loss, replayed on the local forward log-probs, gives the loss
    # the local backend reported and a backward request of the same datums (weights = -dL/dlogp).
    for data, loss_fn, probe_future, future in recorder.custom:
        forward = probe_future.result()
        custom = tinker.TrainingClient._compute_custom_loss(data, loss_fn, forward)
        local_output = future.inner.result()
        assert custom.loss_sum == pytest.approx(
            local_output.metrics["loss:sum"], rel=1e-5, abs=1e-6
        )
        _, backward = decode_wire(to_wire(custom.data, "cross_entropy"))
        for datum, (tokens, inputs) in zip(data, backward, strict=True):
            assert tokens == datum.model_input.to_ints()
            np.testing.assert_array_equal(
                inputs["target_tokens"], datum.loss_fn_inputs["target_tokens"].to_numpy()
            )
            assert inputs["weights"].shape == datum.loss_fn_inputs["weights"].to_numpy().shape
