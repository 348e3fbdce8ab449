"""``LocalServiceClient``: Tinker's ``ServiceClient`` contract, in-process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from sdft.backends.local import _checkpoints as ckpt
from sdft.backends.local._checkpoint_state import load_weights
from sdft.backends.local._deprecated import ServiceClientAsyncShims
from sdft.backends.local._errors import LocalBadRequestError
from sdft.backends.local._modules import (
    SHARED_BASE_MODELS,
    base_tokenizer,
    build_module,
    checkpoint_adapter,
    lora_target_modules,
)
from sdft.backends.local._runtime import ModelRuntime, pick_device
from sdft.backends.local._sampling import LocalSamplingClient
from sdft.backends.local._settings import LoraSettings, TrainingSettings
from sdft.backends.local._training import LocalTrainingClient
from sdft.backends.local._views import WeightView
from sdft.backends.local._worker import SerialWorker, done_future, failed_future
from sdft.models import cache_root, parse_dtype

DEFAULT_LORA_ALPHA = 32.0


class LocalServiceClient(ServiceClientAsyncShims):
    """Creates training and sampling clients that run in this process.

    ``checkpoint_root``: where ``save_state`` / ``save_weights_for_sampler`` write (default
    ``<sdft cache>/checkpoints``). ``device``: ``"auto"`` (CUDA when available), ``"cpu"``,
    ``"cuda"``. ``dtype``: weights of loaded models (``"float32"``, ``"bfloat16"``, ``"float16"``).
    ``lora_alpha``: LoRA scale numerator (scale = alpha / rank; Tinker's is not published, 32 is
    the cookbook's export default). ``tempered_logprobs``: report sampled-token log-probs under the
    distribution actually sampled (temperature / top-k / top-p) instead of the raw model (T = 1,
    what the Tinker service reportedly returns). ``train_batch_tokens``: padded tokens per training
    forward (a ``forward_backward`` call with more is split into micro-batches).
    ``fast_cpu_linear``: run float32 linear layers on CPU through oneDNN (about twice as fast as
    the default BLAS on AMD processors; equal up to float32 summation order).
    ``merge_lora_for_sampling``: LoRA snapshot samplers run merged weights ``W0 + scale * B @ A``
    (one GEMM per layer instead of three; a snapshot keeps its adapters, and merged copies exist
    for the two most recently used snapshots of the process).
    Worker threads return freed memory to the system every few seconds
    (``sdft.backends.local._memory``): without it, a process grew by about 1 GB per LoRA client.
    """

    def __init__(
        self,
        checkpoint_root: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        lora_alpha: float = DEFAULT_LORA_ALPHA,
        tempered_logprobs: bool = False,
        train_batch_tokens: int = 4096,
        fast_cpu_linear: bool = True,
        merge_lora_for_sampling: bool = True,
    ) -> None:
        self.checkpoint_root = (
            Path(checkpoint_root).expanduser()
            if checkpoint_root is not None
            else cache_root() / "checkpoints"
        )
        self.device = pick_device(device)
        self.dtype = parse_dtype(dtype)
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
        self.lora_alpha = float(lora_alpha)
        self.tempered_logprobs = bool(tempered_logprobs)
        if not isinstance(train_batch_tokens, int) or train_batch_tokens < 1:
            raise ValueError(
                f"train_batch_tokens must be a positive int, got {train_batch_tokens!r}"
            )
        self.train_batch_tokens = train_batch_tokens
        self.fast_cpu_linear = bool(fast_cpu_linear)
        self.merge_lora_for_sampling = bool(merge_lora_for_sampling)
        self._worker = SerialWorker("service")
        self._lock = threading.Lock()
        self._base_modules: dict[str, torch.nn.Module] = {}
        # Holding the shared loaded models keeps them in SHARED_BASE_MODELS while this is open.
        self._base_weights: dict[str, torch.nn.Module] = {}
        self._base_runtimes: dict[str, ModelRuntime] = {}
        self._runtimes: list[ModelRuntime] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"LocalServiceClient(device={self.device}, dtype={self.dtype}, checkpoint_root={self.checkpoint_root})"

    def __enter__(self) -> LocalServiceClient:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("success" if exc_type is None else "errored")

    # --- training clients -----------------------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> AwaitableConcurrentFuture[LocalTrainingClient]:
        """A LoRA student on ``base_model`` (adapters on attention, MLP and/or the unembedding,
        initialized from ``seed``; B = 0 so it starts as the base model)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            return failed_future(LocalBadRequestError(f"rank must be a positive int, got {rank!r}"))
        if not (train_mlp or train_attn or train_unembed):
            return failed_future(
                LocalBadRequestError(
                    "at least one of train_mlp, train_attn, train_unembed must be True"
                )
            )
        try:
            _check_optimizer(optimizer)
        except LocalBadRequestError as exc:
            return failed_future(exc)

        def create() -> LocalTrainingClient:
            base = self._base_module(base_model)
            targets = lora_target_modules(
                base, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
            )
            settings = LoraSettings(
                rank=rank,
                alpha=self.lora_alpha,
                seed=seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
                target_modules=tuple(targets),
            )
            return self._training_client(base_model, settings, seed, user_metadata)

        return self._worker.submit(create)

    def create_full_training_client(
        self, base_model: str, seed: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> AwaitableConcurrentFuture[LocalTrainingClient]:
        """Local extra: full fine-tuning (every weight trainable, starting from ``base_model``).
        There is no random initialization; ``seed`` is recorded in checkpoint metadata."""

        def create() -> LocalTrainingClient:
            return self._training_client(base_model, None, seed, user_metadata)

        return self._worker.submit(create)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: Any = None,
    ) -> AwaitableConcurrentFuture[LocalTrainingClient]:
        """A training client with the checkpoint's weights and a fresh optimizer."""
        try:
            _check_optimizer(optimizer)
        except LocalBadRequestError as exc:
            return failed_future(exc)
        return self._from_state(path, base_model, user_metadata, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> AwaitableConcurrentFuture[LocalTrainingClient]:
        """A training client with the checkpoint's weights and AdamW state (exact resume)."""
        return self._from_state(path, base_model, user_metadata, with_optimizer=True)

    def _from_state(
        self,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        *,
        with_optimizer: bool,
    ) -> AwaitableConcurrentFuture[LocalTrainingClient]:
        try:
            directory = ckpt.resolve_path(self.checkpoint_root, path)
        except LocalBadRequestError as exc:
            return failed_future(exc)

        def create() -> LocalTrainingClient:
            shown = str(path)
            ckpt.remove_orphans(directory)
            meta = _checkpoint_meta(directory, shown, base_model)
            lora = checkpoint_adapter(meta, shown)
            seed = lora.seed if lora else meta.get("seed")
            metadata = {**meta.get("user_metadata", {}), **(user_metadata or {})}
            client = self._training_client(meta["base_model"], lora, seed, metadata)
            client.runtime.worker.submit(
                client.load_weights_from, directory, meta, shown, with_optimizer=with_optimizer
            ).result()
            return client

        return self._worker.submit(create)

    def _training_client(
        self,
        base_model: str,
        lora: LoraSettings | None,
        seed: int | None,
        user_metadata: dict[str, str] | None,
    ) -> LocalTrainingClient:
        module = build_module(
            self._base_module(base_model), lora, base_model=base_model, trainable=True
        )
        runtime = self._runtime(module, base_model, label="lora" if lora else "full")
        return LocalTrainingClient(
            runtime,
            base_model=base_model,
            lora=lora,
            seed=seed,
            settings=TrainingSettings(
                checkpoint_root=self.checkpoint_root,
                train_batch_tokens=self.train_batch_tokens,
                merge_lora_for_sampling=self.merge_lora_for_sampling,
                tempered_logprobs=self.tempered_logprobs,
            ),
            open_sampler=lambda path: self.create_sampling_client(model_path=path),
            user_metadata=user_metadata,
        )

    # --- sampling clients -------------------------------------------------------------------------

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        """A sampler on a checkpoint (``model_path``) or on the base weights of ``base_model``."""
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        if model_path is None:
            assert base_model is not None

            def create_base() -> LocalSamplingClient:
                return LocalSamplingClient(
                    self._base_runtime(base_model),
                    WeightView(label="base"),
                    base_model=base_model,
                    tempered_logprobs=self.tempered_logprobs,
                )

            return self._worker.submit(create_base)
        try:
            directory = ckpt.resolve_path(self.checkpoint_root, model_path)
        except LocalBadRequestError as exc:
            return failed_future(exc)

        def create_from_checkpoint() -> LocalSamplingClient:
            shown = str(model_path)
            ckpt.remove_orphans(directory)
            meta = _checkpoint_meta(directory, shown, base_model)
            model = meta["base_model"]
            lora = checkpoint_adapter(meta, shown)
            module = build_module(self._base_module(model), lora, base_model=model, trainable=False)
            load_weights(
                module, is_lora=lora is not None, directory=directory, meta=meta, shown=shown
            )
            runtime = self._runtime(module, model, label="checkpoint")
            return LocalSamplingClient(
                runtime,
                WeightView(label="checkpoint"),
                base_model=model,
                model_path=shown,
                tempered_logprobs=self.tempered_logprobs,
            )

        return self._worker.submit(create_from_checkpoint)

    # --- shared models ----------------------------------------------------------------------------

    def _base_module(self, name: str) -> torch.nn.Module:
        """The frozen base model ``name``: this service's module tree over weights loaded once
        per process (shared with every other service client on the same device and dtype)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the LocalServiceClient is closed")
            module = self._base_modules.get(name)
        if module is None:
            weights, module = SHARED_BASE_MODELS.get(name, device=self.device, dtype=self.dtype)
            with self._lock:
                self._base_weights.setdefault(name, weights)
                module = self._base_modules.setdefault(name, module)
        return module

    def _base_runtime(self, name: str) -> ModelRuntime:
        runtime = self._base_runtimes.get(name)
        if runtime is None:
            runtime = self._runtime(self._base_module(name), name, label="base")
            self._base_runtimes[name] = runtime
        return runtime

    def _runtime(self, module: torch.nn.Module, base_model: str, *, label: str) -> ModelRuntime:
        runtime = ModelRuntime(
            module,
            base_model=base_model,
            tokenizer=base_tokenizer(base_model),
            device=self.device,
            label=label,
            fast_cpu_linear=self.fast_cpu_linear,
        )
        with self._lock:
            self._runtimes.append(runtime)
        return runtime

    # --- lifecycle --------------------------------------------------------------------------------

    def close(
        self, status: str = "success", detail: str | None = None
    ) -> AwaitableConcurrentFuture[None]:
        """Stop every worker of this service client (pending requests are cancelled)."""
        with self._lock:
            self._closed = True
            runtimes, self._runtimes = self._runtimes, []
            # clients already made keep the tensors they use; the service lets go of the rest
            self._base_weights.clear()
            self._base_modules.clear()
            self._base_runtimes.clear()
        for runtime in runtimes:
            runtime.close()
        self._worker.close()
        return done_future(None)


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is None:
        return
    if getattr(optimizer, "type", None) != "adamw":
        raise LocalBadRequestError(
            f"the local backend trains with AdamW; optimizer config type "
            f"{getattr(optimizer, 'type', type(optimizer).__name__)!r} is not supported"
        )


def _checkpoint_meta(directory: Path, shown: str, base_model: str | None) -> dict[str, Any]:
    """A checkpoint's metadata, checked against the ``base_model`` the caller asked for (if any)."""
    meta = ckpt.read_meta(directory, shown)
    model = meta["base_model"]
    if base_model is not None and base_model != model:
        raise LocalBadRequestError(
            f"checkpoint {shown} was trained from {model!r}, not {base_model!r}"
        )
    return meta
