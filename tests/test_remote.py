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
