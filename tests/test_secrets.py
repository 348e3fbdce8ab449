"""Secrets never leave the program: the redaction function, and a Tinker server stub on
127.0.0.1 that echoes the request headers (API key included) in its 401 error body."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sdft import redact as redaction
from sdft.cli import main
from sdft.redact import REDACTED, RedactingFilter, redact, register_secret

KEY = "tml-SECRET123"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "{'Accept': 'x', 'X-API-Key': 'tml-SECRET123'}",
            "{'Accept': 'x', 'X-API-Key': '[REDACTED]'}",
        ),
        ('{"x-api-key": "abc-def-123456"}', '{"x-api-key": "[REDACTED]"}'),
        ("Authorization: Bearer eyJhbGciOi.x-y_z", "Authorization: Bearer [REDACTED]"),
        ("authorization=Basic dXNlcjpwYXNz; next", "authorization=Basic [REDACTED]; next"),
        ("key tml-AbC_12-x9 rejected", "key [REDACTED] rejected"),
        ("no secret here: 401 Unauthorized", "no secret here: 401 Unauthorized"),
    ],
)
def test_redact_header_values_and_tinker_keys(text: str, expected: str) -> None:
    assert redact(text, env={}) == expected


def test_redact_values_of_the_secret_environment_variables() -> None:
    env = {"TINKER_API_KEY": " opaque-key-42 ", "SDFT_SERVE_API_KEY": "serve-key-99", "HOME": "/r"}
    text = "sent opaque-key-42 and serve-key-99 from /r"
    assert redact(text, env=env) == f"sent {REDACTED} and {REDACTED} from /r"
    # Too short to be a key: not treated as one.
    assert redact("a b c", env={"TINKER_API_KEY": "a"}) == "a b c"


def test_registered_secrets_are_redacted(monkeypatch) -> None:
    monkeypatch.setattr(redaction, "_registered", set())
    register_secret("from-a-credential-command")
    assert redact("got from-a-credential-command", env={}) == f"got {REDACTED}"


def test_log_records_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("sdft.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("request failed: %s", f"{{'X-API-Key': '{KEY}'}}")
        try:
            raise RuntimeError(f"Authorization: Bearer {KEY}")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "SECRET123" not in output
    assert "request failed: {'X-API-Key': '[REDACTED]'}" in output
    assert "RuntimeError: Authorization: Bearer [REDACTED]" in output


class _EchoHeaders(BaseHTTPRequestHandler):
    """Answers every request with 401 and a body that repeats the request headers."""

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        detail = f"invalid credentials; request headers were {dict(self.headers)!r}"
        body = json.dumps({"detail": detail}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# The second key has characters a tml- pattern stops at: only the environment value covers it.
@pytest.mark.parametrize("key", [KEY, "tml-opaque.key+77"])
def test_api_key_echoed_by_the_server_is_not_printed_or_saved(
    tmp_path: Path, echo_server: str, capsys, monkeypatch, key: str
) -> None:
    monkeypatch.setenv("TINKER_API_KEY", key)
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "golden_answer": "a"}\n')
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  name: Qwen/Qwen3-4B-Instruct-2507\n"
        f"backend:\n  kind: tinker\n  base_url: {echo_server}\n"
        "data:\n  path: train.jsonl\noutput_dir: out\n"
    )
    assert main(["train", str(config), "--no-progress"]) == 2
    captured = capsys.readouterr()
    summary = (tmp_path / "out" / "summary.md").read_text()
    # The server did echo the headers: the error text reached both outputs, minus the key.
    assert "'X-API-Key': '[REDACTED]'" in captured.err
    assert "- Error: AuthenticationError: Error code: 401" in summary
    assert "'X-API-Key': '[REDACTED]'" in summary
    for output in (captured.out, captured.err, summary):
        assert key not in output
        assert "SECRET" not in output and "key+77" not in output


def test_installed_redaction_covers_handlers_configured_later(monkeypatch) -> None:
    monkeypatch.setattr(redaction, "_factory_installed", False)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())
    redaction.install_log_redaction()
    redaction.install_log_redaction()  # idempotent: one wrapper
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # added after the installation, no filter
    logger = logging.getLogger("uvicorn.test_secrets")
    logger.addHandler(handler)
    try:
        logger.error("echo %s", f"Authorization: Bearer {KEY}")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "echo Authorization: Bearer [REDACTED]\n"
