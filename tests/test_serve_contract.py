"""The backend-contract suite (``tests/test_backend_contract.py``) run over the wire: the same
tests, with the ``backend`` fixture giving a stock ``tinker.ServiceClient`` on ``sdft serve``.

Full fine-tuning is a local-backend extra (Tinker trains LoRA adapters), so the tests that need
it skip here; everything else must hold exactly as it does in-process.

Rejections: the local backend raises ``LocalBadRequestError``, a ``tinker.BadRequestError`` that
is also a ``ValueError``; over the wire the SDK raises a plain ``tinker.BadRequestError``. The
clients handed to the bad-input tests re-raise a status-400 ``BadRequestError`` as the same
dual type (message unchanged), so the contract's message assertions run unchanged on the wire.
"""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
import tinker

import test_backend_contract as contract
from serve_fixture import TINY
from test_backend_contract import Backend


class WireBadRequest(tinker.BadRequestError, ValueError):
    """A 400 from the server, surfaced as the local backend surfaces its rejections."""


class _Future:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._inner.result(timeout=timeout)
        except tinker.BadRequestError as exc:
            assert exc.status_code == 400
            raise WireBadRequest(exc.message, response=exc.response, body=exc.body) from exc


class _Client:
    """The SDK client, with 400 rejections re-raised as :class:`WireBadRequest`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in ("forward", "forward_backward", "sample"):
            return attribute
        return lambda *args, **kwargs: _Future(attribute(*args, **kwargs))


class WireBackend(Backend):
    def full(self) -> NoReturn:
        pytest.skip("full fine-tuning is a local-backend extra; Tinker trains LoRA adapters")


class RejectionBackend(WireBackend):
    def lora(self, seed: int = 0, rank: int = 4) -> Any:
        return _Client(super().lora(seed, rank))

    def base_sampler(self) -> Any:
        return _Client(super().base_sampler())


REJECTION_TESTS = {
    "test_bad_training_inputs_are_rejected_like_the_service",
    "test_bad_sampling_requests_are_rejected",
}


@pytest.fixture()
def backend(
    request: pytest.FixtureRequest, serve_service: Any, tiny_reference_model: Any
) -> Backend:
    kind = RejectionBackend if request.node.originalname in REJECTION_TESTS else WireBackend
    return kind("tinker", serve_service, TINY, tiny_reference_model)


for _name in dir(contract):
    if _name.startswith("test_"):
        globals()[_name] = getattr(contract, _name)
