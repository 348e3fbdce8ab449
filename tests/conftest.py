"""Shared fixtures: the tiny random test model and a local service client.

``sdft/tiny-random`` (see ``sdft.models``) is a 2-layer Llama with the SmolLM2 tokenizer and chat
template; it loads in a fraction of a second once built into the sdft cache. Tests that need the
real SmolLM2-135M-Instruct are marked ``real_model``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Never reach for a model hub from the test suite.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_MODEL = "sdft/tiny-random"
REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_model_name() -> str:
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from sdft.models import load_tokenizer

    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_reference_model() -> Any:
    """A separate float32 CPU copy of the tiny model, for direct torch reference computations
    (treat as read-only)."""
    from sdft.models import load_model

    model = load_model(TINY_MODEL, dtype="float32", device="cpu")
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One CPU ``LocalServiceClient`` for the session (checkpoints in a temporary root)."""
    from sdft.backends.local import LocalServiceClient

    root: Path = tmp_path_factory.mktemp("local-checkpoints")
    service = LocalServiceClient(checkpoint_root=root, device="cpu", dtype="float32")
    yield service
    service.close()


# ``sdft serve`` in a subprocess on the tiny model, for the wire tests (tests/serve_fixture.py).
from serve_fixture import serve_server, serve_service  # noqa: E402, F401
