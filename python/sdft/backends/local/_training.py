"""``LocalTrainingClient``: Tinker's ``TrainingClient`` contract, executed in-process.

Every request is validated in the caller's thread (a rejected one returns a failed future, as the
service answers 400) and then runs on the model's single worker thread, strictly in submission
order. Gradients accumulate in ``.grad`` across ``forward_backward`` calls until ``optim_step``.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from sdft.backends.local import _checkpoints as ckpt
from sdft.backends.local._errors import LocalBadRequestError
from sdft.backends.local._inputs import (
    PreparedDatum,
    check_loss_fn,
    loss_config,
    model_input_tokens,
    parse_adam_params,
    prepare_datums,
)
from sdft.backends.local._losses import datum_loss, forward_kl, rows_with_gradient
from sdft.backends.local._runtime import (
    ModelRuntime,
    WeightView,
    lora_layers,
    merged_lora_view,
    merged_lora_weight,
    trainable_named_parameters,
    view_replacing,
)
from sdft.backends.local._sampling import LocalSamplingClient
from sdft.backends.local._worker import failed_future

if TYPE_CHECKING:
    from sdft.backends.local._service import LocalServiceClient

CustomLossFn = Callable[
    [list[types.Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]
]


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    seed: int | None
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    target_modules: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "seed": self.seed,
            "train_mlp": self.train_mlp,
            "train_attn": self.train_attn,
            "train_unembed": self.train_unembed,
            "target_modules": list(self.target_modules),
        }


class _EmaTeacher:
    """Exponential moving average of the student's weights, refreshed after every optim_step.

    Full fine-tuning averages every parameter. LoRA averages the effective weights
    ``W0 + scale * B @ A`` of each adapted layer (averaging A and B separately would not average
    their product); the teacher runs with adapters off and the averaged weights in place.
    """

    def __init__(self, client: LocalTrainingClient, alpha: float) -> None:
        self.alpha = alpha
        module = client.runtime.module
        with torch.no_grad():
            if client.lora is None:
                self.tensors = {id(p): p.detach().clone() for _, p in client.trainable_parameters}
                self.view = view_replacing(module, self.tensors, label=f"ema(alpha={alpha})")
                self.layers = []
            else:
                self.tensors = {}
                self.layers = [
                    (layer, merged_lora_weight(layer)) for _, layer in lora_layers(module)
                ]
                self.view = merged_lora_view(module, self.layers, label=f"ema(alpha={alpha})")
        self._params = dict((id(p), p) for _, p in client.trainable_parameters)

    @torch.no_grad()
    def update(self) -> None:
        if self.layers:
            for layer, merged in self.layers:
                merged.lerp_(merged_lora_weight(layer), self.alpha)
        else:
            for param_id, tensor in self.tensors.items():
                tensor.lerp_(self._params[param_id].detach(), self.alpha)


class LocalTrainingClient:
    """A trainable model (LoRA adapters or all weights) with its AdamW optimizer."""

    def __init__(
        self,
        service: LocalServiceClient,
        runtime: ModelRuntime,
        *,
        base_model: str,
        lora: LoraSettings | None,
        seed: int | None,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self.service = service
        self.runtime = runtime
        self.base_model = base_model
        self.lora = lora
        self.seed = seed
        self.user_metadata = dict(user_metadata or {})
        self.model_id = f"local-{uuid.uuid4().hex[:12]}"
        self.trainable_parameters = trainable_named_parameters(runtime.module)
        self.optimizer = make_adamw([p for _, p in self.trainable_parameters])
        self.optim_steps = 0
        self._version = 0
        # EMA teachers stay alive as long as a sampler uses them (the sampler owns its EMA).
        self._emas: weakref.WeakSet[_EmaTeacher] = weakref.WeakSet()
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
        return self.runtime.worker.submit(self._run_loss, prepared, loss_fn, config, backward)

    def _run_loss(
        self, prepared: list[PreparedDatum], loss_fn: str, config: dict[str, float], backward: bool
    ) -> types.ForwardBackwardOutput:
        outputs: list[torch.Tensor | None] = [None] * len(prepared)
        total = 0.0
        grad_mode = torch.enable_grad() if backward else torch.no_grad()
        with grad_mode:
            for batch in self._micro_batches(prepared):
                need_grad = None
                if backward:
                    need_grad = [rows_with_gradient(loss_fn, d.values) for d in batch]
                logprobs = self._datum_logprobs(batch, need_grad)
                loss = sum(
                    (
                        datum_loss(loss_fn, lp, d.values_on(self.runtime.device), config)
                        for d, lp in zip(batch, logprobs, strict=True)
                    ),
                    start=torch.zeros((), device=self.runtime.device),
                )
                if backward and loss.requires_grad:
                    loss.backward()
                total += float(loss.detach())
                for d, lp in zip(batch, logprobs, strict=True):
                    outputs[d.index] = lp.detach()
        return _output(prepared, outputs, {"loss:sum": total})

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
        return self.runtime.worker.submit(self._run_custom, list(data), prepared, loss_fn)

    def _run_custom(
        self, data: list[types.Datum], prepared: list[PreparedDatum], loss_fn: CustomLossFn
    ) -> types.ForwardBackwardOutput:
        batches = self._micro_batches(prepared)
        with torch.enable_grad():
            if len(batches) == 1:
                logprobs = self._datum_logprobs(batches[0], None)
                ordered = _ordered(batches[0], logprobs, len(prepared))
                shaped = [
                    lp.reshape(d.target_shape) for d, lp in zip(prepared, ordered, strict=True)
                ]
                loss, metrics = _call_custom(loss_fn, data, shaped)
                if loss.requires_grad:
                    loss.backward()
            else:
                # Two passes keep memory bounded: log-probs without a graph, the loss and its
                # gradient w.r.t. them, then per micro-batch the linear surrogate sum(g * logp).
                with torch.no_grad():
                    ordered = [torch.empty(0)] * len(prepared)
                    for batch in batches:
                        for d, lp in zip(batch, self._datum_logprobs(batch, None), strict=True):
                            ordered[d.index] = lp
                leaves = [
                    lp.reshape(d.target_shape).clone().requires_grad_(True)
                    for d, lp in zip(prepared, ordered, strict=True)
                ]
                loss, metrics = _call_custom(loss_fn, data, leaves)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for batch in batches:
                    upstream = [
                        torch.zeros_like(ordered[d.index])
                        if grads[d.index] is None
                        else grads[d.index].reshape(ordered[d.index].shape).detach()
                        for d in batch
                    ]
                    need_grad = [(g != 0).any(dim=1) for g in upstream]
                    logprobs = self._datum_logprobs(batch, need_grad)
                    surrogate = sum(
                        ((g * lp).sum() for g, lp in zip(upstream, logprobs, strict=True)),
                        start=torch.zeros((), device=self.runtime.device),
                    )
                    if surrogate.requires_grad:
                        surrogate.backward()
        all_metrics = {"loss:sum": float(loss.detach())}
        all_metrics.update({key: float(value) for key, value in metrics.items()})
        return _output(prepared, [lp.detach() for lp in ordered], all_metrics)

    def _micro_batches(self, prepared: list[PreparedDatum]) -> list[list[PreparedDatum]]:
        """Datums packed into padded batches of at most ``train_batch_tokens`` tokens."""
        budget = self.service.train_batch_tokens
        ordered = sorted(prepared, key=lambda d: d.length, reverse=True)
        batches: list[list[PreparedDatum]] = []
        current: list[PreparedDatum] = []
        width = 0
        for d in ordered:
            new_width = max(width, d.length)
            if current and new_width * (len(current) + 1) > budget:
                batches.append(current)
                current, new_width = [], d.length
            current.append(d)
            width = new_width
        if current:
            batches.append(current)
        return batches

    def _datum_logprobs(
        self, batch: list[PreparedDatum], need_grad: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """``log p(targets)`` ``(N, K)`` of each datum of one micro-batch (one padded forward).

        ``need_grad`` marks per datum the rows that enter the loss; the others are computed
        without a graph (they only feed ``loss_fn_outputs``). None = all rows need gradients
        (when grad is enabled).
        """
        rt = self.runtime
        width = max(d.length for d in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, : d.length] = d.tokens
        # Right padding with pure causal attention: real positions never see the pads.
        hidden, _ = rt.hidden_states(ids)
        rows = torch.cat([hidden[i, : d.length] for i, d in enumerate(batch)])
        k_max = max(d.targets.shape[1] for d in batch)
        targets = torch.zeros((rows.shape[0], k_max), dtype=torch.long)
        offset = 0
        for d in batch:
            targets[offset : offset + d.length, : d.targets.shape[1]] = d.targets
            offset += d.length
        targets = targets.to(rt.device)
        if need_grad is None or not torch.is_grad_enabled():
            logprobs = rt.target_logprobs(rows, targets)
        else:
            grad_rows = torch.cat(need_grad).to(rt.device)
            grad_index = torch.nonzero(grad_rows).squeeze(1)
            rest_index = torch.nonzero(~grad_rows).squeeze(1)
            with_grad = rt.target_logprobs(rows[grad_index], targets[grad_index])
            with torch.no_grad():
                without = rt.target_logprobs(rows[rest_index].detach(), targets[rest_index])
            logprobs = (
                torch.zeros((rows.shape[0], k_max), dtype=torch.float32, device=rt.device)
                .index_copy(0, grad_index, with_grad)
                .index_copy(0, rest_index, without)
            )
        out = []
        offset = 0
        for d in batch:
            out.append(logprobs[offset : offset + d.length, : d.targets.shape[1]])
            offset += d.length
        return out

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
        for group in self.optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        with_grad = [p for _, p in self.trainable_parameters if p.grad is not None]
        grad_norm = 0.0
        if with_grad:
            if params.grad_clip_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, params.grad_clip_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
            grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optim_steps += 1
        self._version += 1
        for ema in self._emas:
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
                label = f"snapshot after {self.optim_steps} steps"
                with torch.no_grad():
                    if self.lora is not None and self.service.merge_lora_for_sampling:
                        # Adapters merged into plain weights: sampling then runs one GEMM per
                        # layer instead of three (base, A, B).
                        merged = [
                            (layer, merged_lora_weight(layer))
                            for _, layer in lora_layers(self.runtime.module)
                        ]
                        cached = merged_lora_view(self.runtime.module, merged, label=label)
                    else:
                        copies = {id(p): p.detach().clone() for _, p in self.trainable_parameters}
                        cached = view_replacing(self.runtime.module, copies, label=label)
                self._snapshot = (self._version, weakref.ref(cached))
            view = cached
        return LocalSamplingClient(
            self.runtime,
            view,
            base_model=self.base_model,
            tempered_logprobs=self.service.tempered_logprobs,
            owner=self,
        )

    def create_ema_sampling_client(
        self, alpha: float = 0.01
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        """Local extra: a sampler whose weights are the EMA of this client's weights, starting at
        the current weights and updated ``ema <- (1 - alpha) * ema + alpha * weights`` after every
        ``optim_step`` (the paper's teacher uses alpha = 0.01)."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            return failed_future(LocalBadRequestError(f"alpha must be in (0, 1], got {alpha!r}"))
        return self.runtime.worker.submit(self._create_ema, float(alpha))

    def _create_ema(self, alpha: float) -> LocalSamplingClient:
        ema = _EmaTeacher(self, alpha)
        self._emas.add(ema)
        return LocalSamplingClient(
            self.runtime,
            ema.view,
            base_model=self.base_model,
            tempered_logprobs=self.service.tempered_logprobs,
            owner=ema,
        )

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> AwaitableConcurrentFuture[LocalSamplingClient]:
        return self.service.create_sampling_client(model_path=model_path)

    # --- local extra: exact full-vocabulary forward KL -------------------------------------------

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
            plan = _kl_plan(prepared, teacher_sequences, completion_slices, skip_first_n, teacher)
        except LocalBadRequestError as exc:
            return failed_future(exc)
        if teacher.runtime.vocab_size != self.runtime.vocab_size:
            return failed_future(
                LocalBadRequestError(
                    f"teacher vocabulary ({teacher.runtime.vocab_size}) differs from the student's "
                    f"({self.runtime.vocab_size})"
                )
            )
        return self.runtime.worker.submit(self._run_full_kl, prepared, teacher, plan)

    def _run_full_kl(
        self, prepared: list[PreparedDatum], teacher: LocalSamplingClient, plan: list[_KlItem]
    ) -> types.ForwardBackwardOutput:
        rt = self.runtime
        outputs: list[torch.Tensor | None] = [None] * len(prepared)
        total = 0.0
        positions_total = 0
        for batch in self._micro_batches(prepared):
            items = [plan[d.index] for d in batch if plan[d.index].student_positions]
            teacher_rows = []
            if items:
                teacher_rows = teacher.full_logprob_rows(
                    [item.teacher_tokens for item in items], [item.teacher_rows for item in items]
                )
            by_index = {item.index: rows for item, rows in zip(items, teacher_rows, strict=True)}
            with torch.enable_grad():
                width = max(d.length for d in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                for i, d in enumerate(batch):
                    ids[i, : d.length] = d.tokens
                hidden, _ = rt.hidden_states(ids)
                loss = torch.zeros((), device=rt.device)
                for i, d in enumerate(batch):
                    rows_hidden = hidden[i, : d.length]
                    with torch.no_grad():
                        outputs[d.index] = rt.target_logprobs(
                            rows_hidden.detach(), d.targets.to(rt.device)
                        )
                    if d.index not in by_index:
                        continue
                    index = torch.tensor(plan[d.index].student_positions, device=rt.device)
                    # The teacher rows come from inference mode: clone them into ordinary tensors.
                    teacher_rows_i = by_index[d.index].to(rt.device).clone()
                    loss = loss + self._kl_sum(rows_hidden[index], teacher_rows_i)
                    positions_total += len(plan[d.index].student_positions)
                if loss.requires_grad:
                    loss.backward()
                total += float(loss.detach())
        return _output(
            prepared,
            outputs,
            {"loss:sum": total, "full_kl/positions:sum": float(positions_total)},
        )

    def _kl_sum(self, hidden: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        chunk = rt.chunk_rows()
        total = torch.zeros((), device=rt.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = teacher_rows[start : start + chunk]
            if hidden.shape[0] > chunk:
                total = total + torch.utils.checkpoint.checkpoint(
                    lambda h, t: forward_kl(t, rt.full_logprobs(h)), h, t, use_reentrant=False
                )
            else:
                total = total + forward_kl(t, rt.full_logprobs(h))
        return total

    # --- checkpoints ------------------------------------------------------------------------------

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsResponse]:
        """Weights + optimizer state -> ``local://<model_id>/weights/<name>``."""
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
            self.service.checkpoint_root, self.model_id, kind, name
        )
        optimizer = None
        if kind == "weights":
            optimizer = ckpt.optimizer_payload(
                self.optimizer, self.trainable_parameters, {"optim_steps": self.optim_steps}
            )
        module = self.runtime.module if self.lora else self.runtime.hf_model
        ckpt.write_checkpoint(
            directory,
            meta={
                "kind": "state" if kind == "weights" else "sampler",
                "training": "lora" if self.lora else "full",
                "base_model": self.base_model,
                "lora": self.lora.as_json() if self.lora else None,
                "run_id": self.model_id,
                "name": name,
                "seed": self.seed,
                "optim_steps": self.optim_steps,
                "ttl_seconds": ttl_seconds,
                "user_metadata": {**self.user_metadata, **user_metadata},
            },
            module=module,
            is_lora=self.lora is not None,
            optimizer=optimizer,
            overwrite=overwrite,
            shown=uri,
        )
        if kind == "weights":
            return types.SaveWeightsResponse(path=uri)
        return types.SaveWeightsForSamplerResponse(path=uri)

    def load_weights_from(self, directory: Path, shown: str, *, with_optimizer: bool) -> None:
        """Load a checkpoint of the same kind into this client (runs on the calling thread)."""
        if self.lora is not None:
            ckpt.load_lora_weights(self.runtime.module, directory, shown)
        else:
            ckpt.load_full_weights(self.runtime.hf_model, directory, shown)
        self.optimizer.state.clear()
        if with_optimizer:
            state = ckpt.restore_optimizer(
                self.optimizer, self.trainable_parameters, directory, shown
            )
            self.optim_steps = int(state.get("optim_steps", 0))
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
            directory = ckpt.resolve_path(self.service.checkpoint_root, path)
        except LocalBadRequestError as exc:
            return failed_future(exc)

        def run() -> types.LoadWeightsResponse:
            meta = ckpt.read_meta(directory, str(path))
            self.service.check_compatible(meta, self, str(path))
            self.load_weights_from(directory, str(path), with_optimizer=with_optimizer)
            return types.LoadWeightsResponse(path=str(path), model_id=self.model_id)

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

    # --- deprecated Tinker shims (``await`` gives the future: double await, as in the SDK) --------

    async def forward_async(self, *args: Any, **kwargs: Any) -> AwaitableConcurrentFuture[Any]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(
        self, *args: Any, **kwargs: Any
    ) -> AwaitableConcurrentFuture[Any]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(
        self, *args: Any, **kwargs: Any
    ) -> AwaitableConcurrentFuture[Any]:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> AwaitableConcurrentFuture[Any]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> AwaitableConcurrentFuture[Any]:
        return self.save_state(*args, **kwargs)

    async def save_weights_for_sampler_async(
        self, *args: Any, **kwargs: Any
    ) -> AwaitableConcurrentFuture[Any]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(
        self, *args: Any, **kwargs: Any
    ) -> LocalSamplingClient:
        return await self.save_weights_and_get_sampling_client(*args, **kwargs)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> LocalSamplingClient:
        return await self.create_sampling_client(*args, **kwargs)

    async def get_info_async(self) -> types.GetInfoResponse:
        return self.get_info()


# --- helpers ------------------------------------------------------------------------------------


def make_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """torch's AdamW with Tinker's default hyper-parameters (each optim_step sets its own).

    The fused implementation (one kernel over all tensors; several times faster on CPU) is used
    where torch supports it for these parameters.
    """
    defaults = types.AdamParams()
    kwargs: dict[str, Any] = {
        "lr": defaults.learning_rate,
        "betas": (defaults.beta1, defaults.beta2),
        "eps": defaults.eps,
        "weight_decay": defaults.weight_decay,
    }
    fusable = all(
        p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    return torch.optim.AdamW(params, fused=fusable or None, **kwargs)


def _ordered(
    batch: list[PreparedDatum], logprobs: list[torch.Tensor], n: int
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = [torch.empty(0)] * n
    for d, lp in zip(batch, logprobs, strict=True):
        out[d.index] = lp
    return out


def _call_custom(
    loss_fn: CustomLossFn, data: list[types.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    result = loss_fn(data, logprobs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError("custom loss_fn must return (loss, metrics)")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("custom loss_fn must return a scalar torch.Tensor loss")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"custom loss_fn metrics must be a dict, got {type(metrics).__name__}")
    return loss.reshape(()), dict(metrics)


def _output(
    prepared: list[PreparedDatum],
    logprobs: Sequence[torch.Tensor | None],
    metrics: dict[str, float],
) -> types.ForwardBackwardOutput:
    outputs = []
    for d, lp in zip(prepared, logprobs, strict=True):
        assert lp is not None
        array = lp.detach().to("cpu", torch.float32).reshape(d.target_shape).numpy()
        outputs.append({"logprobs": types.TensorData.from_numpy(array)})
    return types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics=metrics
    )


@dataclass
class _KlItem:
    index: int
    student_positions: list[int]
    teacher_tokens: list[int]
    teacher_rows: list[int]


def _kl_plan(
    prepared: list[PreparedDatum],
    teacher_sequences: Sequence[types.ModelInput | None],
    completion_slices: Sequence[Any],
    skip_first_n: int,
    teacher: LocalSamplingClient,
) -> list[_KlItem]:
    """Which student positions pair with which teacher rows (checked token by token)."""
    if isinstance(skip_first_n, bool) or not isinstance(skip_first_n, int) or skip_first_n < 0:
        raise LocalBadRequestError(f"skip_first_n must be an int >= 0, got {skip_first_n!r}")
    if not (len(prepared) == len(teacher_sequences) == len(completion_slices)):
        raise LocalBadRequestError(
            f"data ({len(prepared)}), teacher_sequences ({len(teacher_sequences)}) and "
            f"completion_slices ({len(completion_slices)}) must have the same length"
        )
    plan = []
    for d, sequence, completion in zip(prepared, teacher_sequences, completion_slices, strict=True):
        i = d.index
        tokens = list(getattr(completion, "tokens", None) or [])
        q = getattr(completion, "teacher_prompt_len", None)
        if not isinstance(q, int) or q < 0:
            raise LocalBadRequestError(
                f"datum {i}: completion slice has no valid teacher_prompt_len ({q!r})"
            )
        mask = d.values["mask"].reshape(-1)
        positions = torch.nonzero(mask > 0).squeeze(1).tolist()
        n = min(len(tokens), len(positions))
        if sequence is None or n <= skip_first_n:
            plan.append(_KlItem(i, [], [], []))
            continue
        teacher_tokens = model_input_tokens(
            sequence,
            where=f"teacher sequence {i}",
            vocab_size=teacher.runtime.vocab_size,
            max_context=teacher.runtime.max_context,
        )
        if len(teacher_tokens) < q + n:
            raise LocalBadRequestError(
                f"datum {i}: teacher sequence has {len(teacher_tokens)} tokens, fewer than "
                f"teacher_prompt_len + completion = {q} + {n}"
            )
        targets = d.targets.reshape(-1)
        student_positions, teacher_rows = [], []
        for t in range(skip_first_n, n):
            position = positions[t]
            row = q + t
            if int(targets[position]) != teacher_tokens[row] or teacher_tokens[row] != tokens[t]:
                raise LocalBadRequestError(
                    f"datum {i}: completion token {t} is {tokens[t]} in the slice, "
                    f"{int(targets[position])} at student position {position} and "
                    f"{teacher_tokens[row]} at teacher row {row}; student and teacher sequences "
                    "are misaligned"
                )
            student_positions.append(position)
            teacher_rows.append(row)
        plan.append(_KlItem(i, student_positions, teacher_tokens, teacher_rows))
    return plan
