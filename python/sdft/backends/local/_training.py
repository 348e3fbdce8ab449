"""``LocalTrainingClient``: Tinker's ``TrainingClient`` contract, executed in-process.

Every request is validated in the caller's thread (a rejected one returns a failed future, as the
service answers 400) and then runs on the model's single worker thread, strictly in submission
order. Gradients accumulate in ``.grad`` across ``forward_backward`` calls until ``optim_step``.
The work itself lives in one module per job: ``_forward_backward`` (losses), ``_full_kl``,
``_adamw``, ``_ema``, ``_views`` (sampler snapshots), ``_checkpoints`` / ``_checkpoint_state``.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from sdft.backends.local import _checkpoint_state as state_files
from sdft.backends.local import _checkpoints as ckpt
from sdft.backends.local._adamw import adamw_step, make_adamw
from sdft.backends.local._deprecated import TrainingClientAsyncShims
from sdft.backends.local._ema import EmaTeacher
from sdft.backends.local._errors import CheckpointExistsError, LocalBadRequestError
from sdft.backends.local._forward_backward import (
    CustomLossFn,
    run_builtin_loss,
    run_custom_loss,
)
from sdft.backends.local._full_kl import kl_plan, run_full_kl
from sdft.backends.local._inputs import (
    check_loss_fn,
    loss_config,
    parse_adam_params,
    prepare_datums,
)
from sdft.backends.local._modules import checkpoint_adapter, trainable_named_parameters
from sdft.backends.local._runtime import ModelRuntime
from sdft.backends.local._sampling import LocalSamplingClient
from sdft.backends.local._settings import LoraSettings, TrainingSettings
from sdft.backends.local._views import WeightView, snapshot_view
from sdft.backends.local._worker import failed_future

SamplerOpener = Callable[[str], AwaitableConcurrentFuture[LocalSamplingClient]]


class LocalTrainingClient(TrainingClientAsyncShims):
    """A trainable model (LoRA adapters or all weights) with its AdamW optimizer.

    Built by ``LocalServiceClient``; ``open_sampler(path)`` is how ``create_sampling_client``
    reaches checkpoints (the service owns the shared base models).
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        base_model: str,
        lora: LoraSettings | None,
        seed: int | None,
        settings: TrainingSettings,
        open_sampler: SamplerOpener,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.base_model = base_model
        self.lora = lora
        self.seed = seed
        self.settings = settings
        self._open_sampler = open_sampler
        self.user_metadata = dict(user_metadata or {})
        self.model_id = f"local-{uuid.uuid4().hex[:12]}"
        self.trainable_parameters = trainable_named_parameters(runtime.module)
        self.optimizer = make_adamw([p for _, p in self.trainable_parameters])
        self.optim_steps = 0
        self._version = 0
        # EMA teachers stay alive as long as a sampler uses them (the sampler owns its EMA); the
        # list keeps their creation order for checkpoints.
        self._emas: list[weakref.ref[EmaTeacher]] = []
        # averages restored from a state checkpoint, waiting for create_ema_sampling_client
        self._saved_emas: list[tuple[float, dict[str, torch.Tensor]]] = []
        self._snapshot: tuple[int, weakref.ref[WeightView]] | None = None

    def __repr__(self) -> str:
        mode = f"LoRA rank {self.lora.rank}" if self.lora else "full fine-tuning"
        return f"LocalTrainingClient({self.base_model}, {mode}, model_id={self.model_id})"

    # --- forward / backward -------------------------------------------------------------------

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        """The loss and per-target log-probs, without gradients."""
        return self._submit_loss(data, loss_fn, loss_fn_config, backward=False)

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        """Add the gradient of the summed loss to the accumulated gradients."""
        return self._submit_loss(data, loss_fn, loss_fn_config, backward=True)

    def _submit_loss(
        self, data: Any, loss_fn: Any, loss_fn_config: Any, *, backward: bool
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        if not data:
            raise ValueError("No data provided")
        try:
            loss_fn = check_loss_fn(loss_fn)
            config = loss_config(loss_fn, loss_fn_config)
            prepared = prepare_datums(
                data,
                loss_fn,
                vocab_size=self.runtime.vocab_size,
                max_context=self.runtime.max_context,
            )
        except LocalBadRequestError as exc:
            return failed_future(exc)
        return self.runtime.worker.submit(
            run_builtin_loss,
            self.runtime,
            prepared,
            loss_fn,
            config,
            backward=backward,
            batch_tokens=self.settings.train_batch_tokens,
        )

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn, *, loss_type_input: Any = None
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        """Run ``loss_fn(data, logprobs_list) -> (loss, metrics)`` on autograd-enabled log-probs
        (each shaped like the datum's ``target_tokens``) and backpropagate ``loss``."""
        if not data:
            raise ValueError("No data provided")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if loss_type_input is not None:
            return failed_future(
                LocalBadRequestError("loss_type_input is not supported by the local backend")
            )
        try:
            prepared = prepare_datums(
                data,
                "custom",
                vocab_size=self.runtime.vocab_size,
                max_context=self.runtime.max_context,
                loss_keys=("target_tokens", "weights"),
                allow_extra_keys=True,
            )
        except LocalBadRequestError as exc:
            return failed_future(exc)
        return self.runtime.worker.submit(
            run_custom_loss,
            self.runtime,
            list(data),
            prepared,
            loss_fn,
            batch_tokens=self.settings.train_batch_tokens,
        )

    def forward_backward_full_kl(
        self,
        data: list[types.Datum],
        teacher: LocalSamplingClient,
        teacher_sequences: Sequence[types.ModelInput | None],
        completion_slices: Sequence[Any],
        skip_first_n: int = 3,
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        """Local extra: backpropagate ``sum KL(teacher || student)`` over the full vocabulary at
        every distilled completion position (what top-K cross-entropy approximates).

        ``data`` are student datums with ``target_tokens`` (N,) and ``mask`` (from
        ``sdft.student_datum_from_rollout``); ``teacher_sequences[i]`` is the teacher prompt +
        completion (``None`` when nothing is distilled); ``completion_slices[i]`` carries
        ``tokens`` and ``teacher_prompt_len``. Completion token ``t`` (``t >= skip_first_n``) is
        predicted at student position ``positions[t]`` (the ``t``-th masked position,
        ``len(P) - 1 + t``) and by teacher row ``teacher_prompt_len + t``.
        """
        if not data:
            raise ValueError("No data provided")
        if not isinstance(teacher, LocalSamplingClient):
            raise TypeError(
                f"teacher must be a LocalSamplingClient (full-vocabulary KL needs local logits), "
                f"got {type(teacher).__name__}"
            )
        try:
            prepared = prepare_datums(
                data,
                "full_kl",
                vocab_size=self.runtime.vocab_size,
                max_context=self.runtime.max_context,
                loss_keys=("target_tokens", "mask"),
                allow_extra_keys=True,
            )
            plan = kl_plan(prepared, teacher_sequences, completion_slices, skip_first_n, teacher)
        except LocalBadRequestError as exc:
            return failed_future(exc)
        if teacher.runtime.vocab_size != self.runtime.vocab_size:
            return failed_future(
                LocalBadRequestError(
                    f"teacher vocabulary ({teacher.runtime.vocab_size}) differs from the student's "
                    f"({self.runtime.vocab_size})"
                )
            )
        return self.runtime.worker.submit(
            run_full_kl,
            self.runtime,
            prepared,
            teacher,
            plan,
            batch_tokens=self.settings.train_batch_tokens,
        )

    # --- optimizer ------------------------------------------------------------------------------

    def optim_step(
        self,
        optim_params: types.AdamParams | None = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> AwaitableConcurrentFuture[types.OptimStepResponse]:
        """One AdamW step (decoupled weight decay, optional global-norm clipping) with these
        hyper-parameters, then gradients are cleared."""
        try:
            params = parse_adam_params(optim_params, adam_params)
        except LocalBadRequestError as exc:
            return failed_future(exc)
        return self.runtime.worker.submit(self._optim_step, params)

    def _optim_step(self, params: types.AdamParams) -> types.OptimStepResponse:
        grad_norm = adamw_step(self.optimizer, [p for _, p in self.trainable_parameters], params)
        self.optim_steps += 1
        self._version += 1
        for ema in self._live_emas():
            ema.update()
        return types.OptimStepResponse(
            metrics={
                "optim/grad_norm:mean": grad_norm,
                "optim/learning_rate:mean": float(params.learning_rate),
                "optim/steps:max": float(self.optim_steps),
            }
        )

    # --- samplers -------------------------------------------------------------------------------

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: Literal["snapshot", "inflight"] = "snapshot",
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        """A sampler on the current weights. ``snapshot`` (default) freezes them: later optim
        steps do not change it; ``inflight`` follows the live weights."""
        if kind not in ("snapshot", "inflight"):
            return failed_future(
                LocalBadRequestError(f"kind must be 'snapshot' or 'inflight', got {kind!r}")
            )
        return self.runtime.worker.submit(self._sampler_now, kind)

    def _sampler_now(self, kind: str) -> LocalSamplingClient:
        if kind == "inflight":
            view = WeightView(label="inflight")
        else:
            cached = (
                self._snapshot[1]()
                if self._snapshot and self._snapshot[0] == self._version
                else None
            )
            if cached is None:
                cached = snapshot_view(
                    self.runtime.module,
                    self.trainable_parameters,
                    is_lora=self.lora is not None,
                    merge_lora=self.settings.merge_lora_for_sampling,
                    label=f"snapshot after {self.optim_steps} steps",
                )
                self._snapshot = (self._version, weakref.ref(cached))
            view = cached
        return LocalSamplingClient(
            self.runtime,
            view,
            base_model=self.base_model,
            tempered_logprobs=self.settings.tempered_logprobs,
            owner=self,
        )

    def create_ema_sampling_client(
        self, alpha: float = 0.01
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        """Local extra: a sampler whose weights are the EMA of this client's weights, starting at
        the current weights and updated ``ema <- (1 - alpha) * ema + alpha * weights`` after every
        ``optim_step`` (the paper's teacher uses alpha = 0.01). ``save_state`` stores every live
        EMA teacher with the checkpoint; a client created from that state continues the saved
        average of the same ``alpha`` instead of starting over."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            return failed_future(LocalBadRequestError(f"alpha must be in (0, 1], got {alpha!r}"))
        return self.runtime.worker.submit(self._create_ema, float(alpha))

    def _create_ema(self, alpha: float) -> LocalSamplingClient:
        ema = EmaTeacher(
            self.runtime.module,
            self.trainable_parameters,
            is_lora=self.lora is not None,
            alpha=alpha,
        )
        # A client resumed from a state checkpoint continues the average saved with it.
        for index, (saved_alpha, tensors) in enumerate(self._saved_emas):
            if saved_alpha == alpha:
                ema.restore(tensors, f"{self.model_id} (resumed EMA, alpha={alpha})")
                del self._saved_emas[index]
                break
        self._emas = [ref for ref in self._emas if ref() is not None] + [weakref.ref(ema)]
        return LocalSamplingClient(
            self.runtime,
            ema.view,
            base_model=self.base_model,
            tempered_logprobs=self.settings.tempered_logprobs,
            owner=ema,
        )

    def _live_emas(self) -> list[EmaTeacher]:
        return [ema for ema in (ref() for ref in self._emas) if ema is not None]

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        return self._open_sampler(model_path)

    # --- checkpoints ------------------------------------------------------------------------------

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsResponse]:
        """Weights + optimizer state (+ the EMA teachers' averages) ->
        ``local://<model_id>/weights/<name>``."""
        return self._submit_save("weights", name, ttl_seconds, overwrite, user_metadata)

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsForSamplerResponse]:
        """Weights only -> ``local://<model_id>/sampler_weights/<name>`` (replaced if present)."""
        return self._submit_save("sampler_weights", name, ttl_seconds, True, user_metadata)

    def _submit_save(
        self,
        kind: ckpt.CheckpointKind,
        name: Any,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, str] | None,
    ) -> AwaitableConcurrentFuture[Any]:
        try:
            name = ckpt.check_name(name)
        except LocalBadRequestError as exc:
            return failed_future(exc)
        return self.runtime.worker.submit(
            self._save, kind, name, ttl_seconds, overwrite, dict(user_metadata or {})
        )

    def _save(
        self,
        kind: ckpt.CheckpointKind,
        name: str,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, str],
    ) -> types.SaveWeightsResponse | types.SaveWeightsForSamplerResponse:
        uri = ckpt.checkpoint_uri(self.model_id, kind, name)
        directory = ckpt.checkpoint_directory(
            self.settings.checkpoint_root, self.model_id, kind, name
        )
        if (directory.exists() or directory.is_symlink()) and not overwrite:
            raise CheckpointExistsError(
                f"checkpoint {uri} already exists; pass overwrite=True to replace it"
            )
        is_lora = self.lora is not None
        module = self.runtime.module if is_lora else self.runtime.hf_model
        contents = state_files.weight_files(module, is_lora=is_lora)
        ema_entries: list[dict[str, Any]] = []
        if kind == "weights":
            contents.update(
                state_files.optimizer_files(
                    self.optimizer, self.trainable_parameters, {"optim_steps": self.optim_steps}
                )
            )
            ema_contents, ema_entries = state_files.ema_files(
                [(ema.alpha, ema.named) for ema in self._live_emas()]
            )
            contents.update(ema_contents)
        ckpt.write_checkpoint(
            directory,
            meta={
                "kind": "state" if kind == "weights" else "sampler",
                "training": "lora" if is_lora else "full",
                "base_model": self.base_model,
                "lora": self.lora.as_json() if self.lora else None,
                "run_id": self.model_id,
                "name": name,
                "seed": self.seed,
                "optim_steps": self.optim_steps,
                "ttl_seconds": ttl_seconds,
                "user_metadata": {**self.user_metadata, **user_metadata},
                **({"ema": ema_entries} if ema_entries else {}),
            },
            contents=contents,
            overwrite=overwrite,
            shown=uri,
        )
        if kind == "weights":
            return types.SaveWeightsResponse(path=uri)
        return types.SaveWeightsForSamplerResponse(path=uri)

    def check_compatible(self, meta: dict[str, Any], shown: str) -> None:
        """Raise unless checkpoint ``meta`` can be loaded into this client."""
        if meta["base_model"] != self.base_model:
            raise LocalBadRequestError(
                f"checkpoint {shown} was trained from {meta['base_model']!r}, this client trains "
                f"{self.base_model!r}"
            )
        kind = "lora" if self.lora else "full"
        if meta["training"] != kind:
            raise LocalBadRequestError(
                f"checkpoint {shown} holds {meta['training']} weights, this client is {kind}"
            )
        adapter = checkpoint_adapter(meta, shown)
        if self.lora and adapter and not adapter.same_adapter(self.lora):
            raise LocalBadRequestError(
                f"checkpoint {shown}: its LoRA settings differ from this client's"
            )

    def load_weights_from(
        self, directory: Path, meta: dict[str, Any], shown: str, *, with_optimizer: bool
    ) -> None:
        """Load a verified checkpoint (``meta`` from ``read_meta``) of the same kind into this
        client; runs on the calling thread."""
        is_lora = self.lora is not None
        module = self.runtime.module if is_lora else self.runtime.hf_model
        state_files.load_weights(
            module, is_lora=is_lora, directory=directory, meta=meta, shown=shown
        )
        self.optimizer.state.clear()
        if with_optimizer:
            state = state_files.restore_optimizer(
                self.optimizer, self.trainable_parameters, directory, meta, shown
            )
            self.optim_steps = int(state.get("optim_steps", 0))
            self._saved_emas = state_files.read_emas(directory, meta, shown)
        self._version += 1

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[types.LoadWeightsResponse]:
        """Deprecated in Tinker (use ``create_training_client_from_state``): load weights only."""
        return self._submit_load(path, with_optimizer=False)

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[types.LoadWeightsResponse]:
        return self._submit_load(path, with_optimizer=True)

    def _submit_load(self, path: str, *, with_optimizer: bool) -> AwaitableConcurrentFuture[Any]:
        try:
            directory = ckpt.resolve_path(self.settings.checkpoint_root, path)
        except LocalBadRequestError as exc:
            return failed_future(exc)

        def run() -> types.LoadWeightsResponse:
            shown = str(path)
            ckpt.remove_orphans(directory)
            meta = ckpt.read_meta(directory, shown)
            self.check_compatible(meta, shown)
            self.load_weights_from(directory, meta, shown, with_optimizer=with_optimizer)
            return types.LoadWeightsResponse(path=shown, model_id=self.model_id)

        return self.runtime.worker.submit(run)

    # --- info -------------------------------------------------------------------------------------

    def get_info(self) -> types.GetInfoResponse:
        architectures = getattr(self.runtime.config, "architectures", None) or [
            getattr(self.runtime.config, "model_type", "unknown")
        ]
        return types.GetInfoResponse(
            type="get_info",
            model_data=types.ModelData(
                arch=architectures[0], model_name=self.base_model, tokenizer_id=self.base_model
            ),
            model_id=self.model_id,
            is_lora=self.lora is not None,
            lora_rank=self.lora.rank if self.lora else None,
            model_name=self.base_model,
        )

    def get_tokenizer(self) -> Any:
        return self.runtime.tokenizer
