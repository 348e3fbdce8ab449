"""Talking to a service client (local or Tinker): build the one the config selects, await its
futures, and seed and stop its sampling requests the same way everywhere."""

from __future__ import annotations

import inspect
from typing import Any

from sdft.config import Config


async def resolve(value: Any) -> Any:
    """The value behind a Tinker-style future (``result_async``), an awaitable, or a plain value."""
    if hasattr(value, "result_async"):
        return await value.result_async()
    if inspect.isawaitable(value):
        return await value
    return value


async def resolve_optional(request: Any) -> Any:
    """:func:`resolve`, with ``None`` for a request that was never made."""
    return None if request is None else await resolve(request)


def build_service_client(config: Config) -> Any:
    """The service client ``backend.kind`` selects (local: in-process; tinker: the real SDK)."""
    if config.backend.kind == "tinker":
        from sdft.backends.remote import create_service_client

        return create_service_client(config.backend.base_url)
    from sdft.backends.local import LocalServiceClient

    return LocalServiceClient(
        checkpoint_root=config.checkpoint_root,
        device=config.backend.device,
        dtype=config.backend.dtype,
    )


def sampling_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, request)."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


def stop_tokens(tokenizer: Any) -> list[int] | None:
    """Stop at the tokenizer's end-of-turn token (chat models: ``<|im_end|>`` and the like)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else None
