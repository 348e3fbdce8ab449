"""The Tinker backend accepts every credential the SDK accepts: ``TINKER_API_KEY``,
``TINKER_CREDENTIAL_CMD`` and the key stored by ``tinker auth login``; with none, or with an
unreachable URL, it still fails at once and clearly. Checked against ``sdft serve``."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from tinker.lib.credentials import JsonCredentialStore, ManualKey

from sdft.backends.remote import (
    TinkerUnavailableError,
    check_api_key,
    create_service_client,
    credential_source,
    stored_api_key,
)
from serve_fixture import TINY, ServeProcess


def store_key(path: Path, key: str) -> None:
    store = JsonCredentialStore(path)
    store.add_key("laptop", ManualKey(key=key, name="laptop"))
    store.set_default("laptop")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_credential_sources_in_the_sdks_order(tmp_path: Path) -> None:
    stored = tmp_path / "credentials.json"
    assert credential_source({}, stored) is None
    store_key(stored, "tml-stored-key-123")
    assert stored_api_key(stored) == "tml-stored-key-123"
    assert credential_source({}, stored) == "the key stored by `tinker auth login`"
    assert credential_source({"TINKER_CREDENTIAL_CMD": "print-key"}, stored) == (
        "TINKER_CREDENTIAL_CMD"
    )
    env = {"TINKER_API_KEY": "tml-env", "TINKER_CREDENTIAL_CMD": "print-key"}
    assert credential_source(env, stored) == "TINKER_API_KEY"
    assert check_api_key(env, stored) == "TINKER_API_KEY"
    (tmp_path / "broken.json").write_text("{not json")
    assert stored_api_key(tmp_path / "broken.json") is None


def test_no_credential_fails_at_once_naming_every_source(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TinkerUnavailableError) as info:
        create_service_client("http://127.0.0.1:1", env={}, credentials_path=tmp_path / "none.json")
    assert time.monotonic() - started < 0.5
    assert str(info.value) == (
        "TINKER_API_KEY is not set: backend.kind: tinker needs a Tinker credential (export "
        "TINKER_API_KEY=..., set TINKER_CREDENTIAL_CMD to a command that prints one, or run "
        "`tinker auth login`; or use backend.kind: local to train offline)"
    )


def test_credential_command_is_accepted_and_unreachable_url_still_fails_fast(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(TinkerUnavailableError, match=f"^cannot connect to {url}: "):
        create_service_client(
            url,
            env={"TINKER_CREDENTIAL_CMD": "echo tml-from-command"},
            credentials_path=tmp_path / "none.json",
        )
    assert time.monotonic() - started < 5


def test_a_key_stored_by_tinker_auth_login_trains_against_sdft_serve(
    serve_server: ServeProcess, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.delenv("TINKER_CREDENTIAL_CMD", raising=False)
    store_key(tmp_path / ".tinker" / "credentials.json", serve_server.key)
    service = create_service_client(serve_server.url)
    client = service.create_lora_training_client(TINY, rank=2, seed=0).result(timeout=300)
    assert client.get_info().model_data.model_name == TINY
