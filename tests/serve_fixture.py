"""``sdft serve`` in a subprocess, for the wire tests: started with ``--port 0`` on the tiny model,
its URL read from what it prints when ready, stopped (terminate, then kill) afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TINY = "sdft/tiny-random"
SERVE_KEY = "tml-sdft-serve-test-key-0123"
START_TIMEOUT_S = 180.0


@dataclass
class ServeProcess:
    """A running server: ``url``, ``key``, its checkpoint root and what it printed."""

    url: str
    key: str
    checkpoint_root: Path
    process: subprocess.Popen[str] = field(repr=False)
    output: list[str] = field(default_factory=list, repr=False)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_server(
    checkpoint_root: Path,
    *extra: str,
    key: str = SERVE_KEY,
    models: tuple[str, ...] = (TINY,),
) -> ServeProcess:
    """Start ``python -m sdft.serve --port 0`` and wait until it prints its URL."""
    env = {
        **os.environ,
        "SDFT_SERVE_API_KEY": key,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [
        sys.executable, "-m", "sdft.serve", "--port", "0", "--device", "cpu",
        "--checkpoint-root", str(checkpoint_root), "--models", *models, *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if "listening on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.wait(0.2):
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("sdft serve did not start:\n" + "\n".join(output))
    lines = [line for line in output if "listening on" in line]
    if not lines:
        process.wait(timeout=10)
        raise RuntimeError(f"sdft serve exited ({process.returncode}):\n" + "\n".join(output))
    url = lines[0].split("listening on ", 1)[1].strip()
    return ServeProcess(url, key, checkpoint_root, process, output)


@pytest.fixture(scope="session")
def serve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``sdft serve`` on the tiny model for the whole test session."""
    server = start_server(tmp_path_factory.mktemp("serve-checkpoints"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_service(serve_server: ServeProcess) -> Iterator[object]:
    """A stock ``tinker.ServiceClient`` on the session's server."""
    import tinker

    service = tinker.ServiceClient(base_url=serve_server.url, api_key=serve_server.key)
    yield service
