"""``LocalSamplingClient``: Tinker's ``SamplingClient`` contract, executed in-process.

Concurrent ``sample`` calls on samplers of one runtime are coalesced: each call queues its
validated request; one drain task on the runtime's worker takes everything queued and runs it as
padded batches (per weight view), so an ``asyncio.gather`` of many teacher-scoring prefills or of
B prompts x num_samples becomes a few batched forwards.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from sdft.backends.local._deprecated import SamplingClientAsyncShims
from sdft.backends.local._errors import LocalBadRequestError
from sdft.backends.local._inference import (
    generate,
    prefill,
    prompt_full_logprobs,
    sampled_sequence,
    score_prompts,
)
from sdft.backends.local._inputs import (
    SampleRequest,
    model_input_tokens,
    prepare_sample_request,
)
from sdft.backends.local._runtime import ModelRuntime
from sdft.backends.local._views import WeightView
from sdft.backends.local._worker import failed_future

# A batch holds at most this many padded prompt tokens / generated rows; larger sets of queued
# requests run as several batches.
PREFILL_TOKEN_BUDGET = 16384
MAX_BATCH_ROWS = 256
# Requests arriving within this window of each other share a batch.
COALESCE_WINDOW_S = 0.005

_sequence_ids = itertools.count()


@dataclass
class _Queued:
    sampler: LocalSamplingClient
    request: SampleRequest
    future: concurrent.futures.Future[types.SampleResponse]
    queued_at: float


class LocalSamplingClient(SamplingClientAsyncShims):
    """Samples from (and scores prompts with) one set of weights on a :class:`ModelRuntime`."""

    def __init__(
        self,
        runtime: ModelRuntime,
        view: WeightView,
        *,
        base_model: str,
        model_path: str | None = None,
        tempered_logprobs: bool = False,
        owner: Any = None,
    ) -> None:
        self.runtime = runtime
        self.view = view
        self.base_model = base_model
        self.model_path = model_path
        self.tempered_logprobs = tempered_logprobs
        self.sampler_id = f"local-sampler-{uuid.uuid4().hex[:10]}"
        # Keeps whatever owns the view's tensors (e.g. a training client's EMA state) alive.
        self._owner = owner

    def __repr__(self) -> str:
        source = self.model_path or f"{self.base_model} ({self.view.label})"
        return f"LocalSamplingClient({source})"

    # --- Tinker surface ---------------------------------------------------------------------

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> AwaitableConcurrentFuture[types.SampleResponse]:
        """Sample ``num_samples`` completions of ``prompt``; optionally score the prompt.

        ``prompt_logprobs_np[i] = log p(prompt[i] | prompt[:i])`` (NaN at 0 and at rows excluded
        by ``prompt_logprobs_last_n``); ``topk_prompt_logprobs_np`` row ``i`` is the top-K of the
        same full-vocabulary distribution, row 0 and excluded rows ``(0, -99999.0)``.
        """
        rt = self.runtime
        try:
            request = prepare_sample_request(
                prompt,
                num_samples,
                sampling_params,
                include_prompt_logprobs=include_prompt_logprobs,
                topk_prompt_logprobs=topk_prompt_logprobs,
                topk_sample_logprobs=topk_sample_logprobs,
                target_prompt_logprobs=target_prompt_logprobs,
                prompt_alt_tokens_k=prompt_alt_tokens_k,
                prompt_logprobs_last_n=prompt_logprobs_last_n,
                vocab_size=rt.vocab_size,
                max_context=rt.max_context,
                eos_tokens=rt.eos_tokens,
            )
        except LocalBadRequestError as exc:
            return failed_future(exc)
        future: concurrent.futures.Future[types.SampleResponse] = concurrent.futures.Future()
        _enqueue(rt, _Queued(self, request, future, time.monotonic()))
        return AwaitableConcurrentFuture(future)

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> AwaitableConcurrentFuture[list[float | None]]:
        """``[None, log p(prompt[1] | prompt[:1]), ...]`` (one entry per prompt token)."""
        inner = self.sample(
            prompt,
            1,
            types.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )
        outer: concurrent.futures.Future[list[float | None]] = concurrent.futures.Future()

        def forward(done: concurrent.futures.Future[types.SampleResponse]) -> None:
            error = done.exception()
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result().prompt_logprobs or [])

        inner.future().add_done_callback(forward)
        return AwaitableConcurrentFuture(outer)

    def get_tokenizer(self) -> Any:
        return self.runtime.tokenizer

    def get_base_model(self) -> str:
        return self.base_model

    # --- local extras -----------------------------------------------------------------------

    def full_logprob_rows(
        self, prompts: list[list[int]], rows: list[list[int]]
    ) -> list[torch.Tensor]:
        """Full-vocabulary log-softmax rows of each prompt (row ``i`` predicts token ``i``),
        computed on this sampler's weights. Blocks; runs inline when called from the runtime's
        own worker (e.g. an EMA teacher used by its own training client)."""
        for j, prompt in enumerate(prompts):
            model_input_tokens(
                types.ModelInput.from_ints(prompt),
                where=f"teacher sequence {j}",
                vocab_size=self.runtime.vocab_size,
                max_context=self.runtime.max_context,
            )
        if self.runtime.worker.in_worker_thread():
            return self._full_logprob_rows(prompts, rows)
        return self.runtime.worker.submit(self._full_logprob_rows, prompts, rows).result()

    def _full_logprob_rows(
        self, prompts: list[list[int]], rows: list[list[int]]
    ) -> list[torch.Tensor]:
        with torch.inference_mode(), self.view.applied(self.runtime):
            return prompt_full_logprobs(self.runtime, prompts, rows)


def _enqueue(rt: ModelRuntime, item: _Queued) -> None:
    with rt.pending_lock:
        rt.pending.append(item)
        if rt.drain_scheduled:
            return
        rt.drain_scheduled = True
    try:
        rt.worker.submit(_drain, rt)
    except RuntimeError as exc:  # worker closed
        with rt.pending_lock:
            stranded, rt.pending = rt.pending, []
            rt.drain_scheduled = False
        for queued in stranded:
            queued.future.set_exception(exc)


def _drain(rt: ModelRuntime) -> None:
    """Take everything queued on ``rt`` and run it, batched per sampler view."""
    while True:
        with rt.pending_lock:
            newest = max((q.queued_at for q in rt.pending), default=None)
        if newest is None:
            break
        wait = COALESCE_WINDOW_S - (time.monotonic() - newest)
        if wait <= 0:
            break
        time.sleep(wait)
    with rt.pending_lock:
        items, rt.pending = rt.pending, []
        rt.drain_scheduled = False
    by_view: dict[int, list[_Queued]] = {}
    for item in items:
        if item.future.set_running_or_notify_cancel():
            by_view.setdefault(id(item.sampler.view), []).append(item)
    for group in by_view.values():
        for batch in _batches(group):
            try:
                responses = _run_batch(rt, batch)
            except Exception as exc:  # delivered to every caller of the batch
                for item in batch:
                    item.future.set_exception(exc)
                continue
            for item, response in zip(batch, responses, strict=True):
                item.future.set_result(response)


def _batches(items: list[_Queued]) -> list[list[_Queued]]:
    # Sorting by prompt keeps requests that share a prefix in one batch.
    ordered = sorted(items, key=lambda q: q.request.prompt)
    batches: list[list[_Queued]] = []
    current: list[_Queued] = []
    width = rows = 0
    for item in ordered:
        length = len(item.request.prompt)
        new_width = max(width, length)
        new_rows = rows + item.request.num_samples
        if current and (
            new_width * (len(current) + 1) > PREFILL_TOKEN_BUDGET or new_rows > MAX_BATCH_ROWS
        ):
            batches.append(current)
            current, width, new_width, new_rows = [], 0, length, item.request.num_samples
        current.append(item)
        width, rows = new_width, new_rows
    if current:
        batches.append(current)
    return batches


def _run_batch(rt: ModelRuntime, batch: list[_Queued]) -> list[types.SampleResponse]:
    sampler = batch[0].sampler
    requests = [item.request for item in batch]
    unique: dict[tuple[int, ...], int] = {}
    prompt_index = []
    for r in requests:
        prompt_index.append(unique.setdefault(tuple(r.prompt), len(unique)))
    prompts = [list(p) for p in unique]
    need_cache = any(r.max_tokens > 1 for r in requests)
    with torch.inference_mode(), sampler.view.applied(rt):
        pre = prefill(rt, prompts, need_cache=need_cache)
        scores = score_prompts(rt, pre, requests, prompt_index)
        rows = generate(
            rt, pre, requests, prompt_index, tempered_logprobs=sampler.tempered_logprobs
        )
    responses = []
    seen_prompts: set[int] = set()
    seen_groups: set[int] = set()
    for r, u, score, request_rows in zip(requests, prompt_index, scores, rows, strict=True):
        # Prompt tokens whose KV this request reused from work done for an earlier request.
        cached = 0
        group = int(pre.group[u])
        if u in seen_prompts:
            cached = len(r.prompt)
        elif group >= 0 and group in seen_groups:
            cached = int(pre.prefix_len[u])
        seen_prompts.add(u)
        if group >= 0:
            seen_groups.add(group)
        sequences = [
            sampled_sequence(
                row, f"{sampler.sampler_id}-{next(_sequence_ids)}", r.topk_sample_logprobs
            )
            for row in request_rows
        ]
        responses.append(
            types.SampleResponse(
                sequences=sequences,
                prompt_logprobs_np=None if score is None else score.prompt_logprobs,
                topk_prompt_logprobs_np=None if score is None else score.topk,
                target_prompt_logprobs=None if score is None else score.target_logprobs,
                prompt_cache_hit_tokens=cached,
            )
        )
    return responses
