"""One full SDFT step on SmolLM2-135M-Instruct on CPU, local backend (and TRL side by side).

A step, as the training loop runs it: sample 4 student completions of 64 tokens (one batched,
KV-cached generation), score the 4 teacher-forced sequences with the frozen base-model teacher
(top-20 prompt log-probs of the completion rows, one coalesced prefill), build the (N, 20) targets
with ``sdft.build_topk_targets``, ``forward_backward(cross_entropy)`` + ``optim_step``, and refresh
the student sampler (``save_weights_and_get_sampling_client``). Full fine-tuning and LoRA rank 16
(Tinker's default placement: attention, MLP and unembedding). Reported: seconds per step
(pytest-benchmark), CPU seconds per step (all threads of the process) and the peak resident memory
during the measured steps.

TRL's ``SDFTTrainer`` (``trl.experimental.sdft``) runs the same job in the same process when
``trl`` is installed (it is not a project dependency): batch of 4 questions, one completion each,
``max_completion_length=64``, ``distillation_topk=20``, ``gradient_checkpointing=False`` (with TRL's
default ``True`` generation runs without KV cache, about 50 s/step here), everything else TRL's
defaults (LoRA: peft ``r=16, lora_alpha=32`` with peft's default target modules).

    python -m pytest benches/bench_step.py -p no:cacheprovider -s --benchmark-columns=mean,min,max,rounds

``SDFT_BENCH_ROUNDS`` (default 3) sets the measured steps per case; one warm-up step runs first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tinker import types

from sdft.backends.local import LocalServiceClient
from sdft.data import (
    build_student_prompt,
    build_teacher_forced_sequence,
    build_teacher_prompt,
    build_topk_targets,
    extract_completion_tokens,
    student_datum_from_rollout,
)
from sdft.models import DEFAULT_MODEL

QUESTIONS = [
    (
        "Why does ice float on liquid water?",
        "Ice is less dense than liquid water: hydrogen bonds hold the molecules in an open "
        "hexagonal lattice, so the same mass takes up more volume and floats.",
    ),
    (
        "What gas do plants absorb for photosynthesis?",
        "Carbon dioxide. Plants take in CO2 through their stomata and, using light energy, turn "
        "it and water into glucose and oxygen.",
    ),
    (
        "What is Newton's second law of motion?",
        "The net force on an object equals its mass times its acceleration (F = ma), so a larger "
        "force gives a larger acceleration and a heavier object accelerates less.",
    ),
    (
        "Why is the sky blue?",
        "Air molecules scatter short (blue) wavelengths of sunlight much more strongly than long "
        "ones (Rayleigh scattering), so blue light reaches us from every part of the sky.",
    ),
]
COMPLETION_TOKENS = 64
TOPK = 20
LEARNING_RATE = 1e-5
ROUNDS = int(os.environ.get("SDFT_BENCH_ROUNDS", "3"))
THREADS = len(os.sched_getaffinity(0))

RESULTS: dict[str, dict[str, float]] = {}


def _release_memory() -> None:
    """Free what earlier cases left behind, so each case's peak is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Linux: reset VmHWM so it measures the peak from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class CpuClock:
    """Process CPU seconds (all threads) per measured call: less sensitive than wall time to
    other processes competing for the same cores."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def timed(self, fn: Any) -> Any:
        def run() -> Any:
            started = time.process_time()
            try:
                return fn()
            finally:
                self.samples.append(time.process_time() - started)

        return run

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)


def _report(name: str, benchmark: Any, peak_mib: float, cpu: CpuClock) -> None:
    stats = benchmark.stats.stats
    load = os.getloadavg()[0]
    RESULTS[name] = {
        "mean_s": stats.mean,
        "min_s": stats.min,
        "cpu_s": cpu.mean,
        "peak_rss_mib": peak_mib,
    }
    benchmark.extra_info.update(
        {
            "peak_rss_mib": round(peak_mib, 1),
            "cpu_s_per_step": round(cpu.mean, 3),
            "threads": THREADS,
            "load_average_1min": load,
        }
    )
    print(
        f"\n[bench_step] {name}: {stats.mean:.2f} s/step (min {stats.min:.2f}, {stats.rounds} "
        f"rounds), {cpu.mean:.2f} CPU s/step, peak RSS {peak_mib:.0f} MiB, {THREADS} threads, "
        f"load average {load:.1f}"
    )


class LocalSDFT:
    """The loop's step against the local backend."""

    def __init__(self, service: LocalServiceClient, lora: bool) -> None:
        if lora:
            future = service.create_lora_training_client(DEFAULT_MODEL, rank=16, seed=0)
        else:
            future = service.create_full_training_client(DEFAULT_MODEL, seed=0)
        self.client = future.result()
        self.teacher = service.create_sampling_client(base_model=DEFAULT_MODEL).result()
        self.sampler = self.client.save_weights_and_get_sampling_client().result()
        tokenizer = self.client.get_tokenizer()
        self.vocab_size = len(tokenizer)
        self.student_prompts = [
            build_student_prompt(question=q, tokenizer=tokenizer) for q, _ in QUESTIONS
        ]
        self.teacher_prompts = [
            build_teacher_prompt(question=q, golden_answer=a, tokenizer=tokenizer)
            for q, a in QUESTIONS
        ]
        self.steps = 0

    def step(self) -> dict[str, float]:
        return asyncio.run(self._step())

    async def _step(self) -> dict[str, float]:
        self.steps += 1
        samples = await asyncio.gather(
            *(
                self.sampler.sample(
                    prompt,
                    1,
                    types.SamplingParams(
                        max_tokens=COMPLETION_TOKENS,
                        temperature=1.0,
                        seed=1000 * self.steps + i,
                        stop=[],
                    ),
                ).coroutine()
                for i, prompt in enumerate(self.student_prompts)
            )
        )
        data, slices, sequences = [], [], []
        for student, teacher, response in zip(
            self.student_prompts, self.teacher_prompts, samples, strict=True
        ):
            tokens = response.sequences[0].tokens
            datum = student_datum_from_rollout(prompt=student, completion_tokens=tokens)
            completion = extract_completion_tokens(datum, teacher.length, max_context_length=8192)
            data.append(datum)
            slices.append(completion)
            sequences.append(build_teacher_forced_sequence(teacher, completion.tokens))
        scores = await asyncio.gather(
            *(
                self.teacher.sample(
                    sequence,
                    1,
                    types.SamplingParams(max_tokens=1),
                    include_prompt_logprobs=True,
                    topk_prompt_logprobs=TOPK,
                    prompt_logprobs_last_n=len(completion.tokens),
                ).coroutine()
                for sequence, completion in zip(sequences, slices, strict=True)
            )
        )
        datums, metrics = build_topk_targets(
            student_data=data,
            completion_slices=slices,
            teacher_topk_logprobs=scores,
            topk=TOPK,
            vocab_size=self.vocab_size,
        )
        fb = self.client.forward_backward(datums, "cross_entropy")
        optim = self.client.optim_step(
            types.AdamParams(learning_rate=LEARNING_RATE, beta2=0.999, eps=1e-8)
        )
        output = await fb
        await optim
        self.sampler = await self.client.save_weights_and_get_sampling_client()
        return {
            "loss": output.metrics["loss:sum"],
            "positions": metrics["sdft/distilled_positions"],
        }


@pytest.mark.parametrize("mode", ["full", "lora16"])
def test_local_sdft_step(benchmark: Any, tmp_path: Path, mode: str) -> None:
    torch.set_num_threads(THREADS)
    _release_memory()
    with LocalServiceClient(tmp_path, device="cpu", dtype="float32") as service:
        job = LocalSDFT(service, lora=mode == "lora16")
        job.step()  # warm-up (allocations, first-call overheads)
        _reset_peak_rss()
        cpu = CpuClock()
        result = benchmark.pedantic(cpu.timed(job.step), rounds=ROUNDS, iterations=1)
        peak = _peak_rss_mib()
    assert result["positions"] == len(QUESTIONS) * (COMPLETION_TOKENS - 3)
    assert result["loss"] > 0
    _report(f"local {mode}", benchmark, peak, cpu)


# --- TRL side by side ---------------------------------------------------------------------------


def _trl_trainer(mode: str, output_dir: Path) -> Any:
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from sdft.models import load_model, load_tokenizer

    model = load_model(DEFAULT_MODEL, dtype="float32", device="cpu")
    model.train()
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q, _ in QUESTIONS] * (ROUNDS + 2),
            "privileged_context": [
                f"This is an example for a response to the question:\n{a}" for _, a in QUESTIONS
            ]
            * (ROUNDS + 2),
        }
    )
    config = SDFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=len(QUESTIONS),
        num_generations=1,
        max_completion_length=COMPLETION_TOKENS,
        distillation_topk=TOPK,
        learning_rate=LEARNING_RATE,
        max_steps=ROUNDS + 1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        shuffle_dataset=False,
        disable_tqdm=True,
        # TRL's default gradient checkpointing also turns the KV cache off during generation
        # (quadratic re-computation, ~50 s/step here); without it TRL generates with the cache.
        gradient_checkpointing=False,
        use_cache=True,
    )
    peft_config = None
    if mode == "lora16":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM")
    return SDFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("mode", ["full", "lora16"])
def test_trl_sdft_step(benchmark: Any, tmp_path: Path, mode: str) -> None:
    """TRL trains in a background thread; each benchmark round lets it run exactly one step
    (generation, teacher and student forwards, backward, optimizer) and waits for its end."""
    from transformers import TrainerCallback

    torch.set_num_threads(THREADS)
    _release_memory()
    trainer = _trl_trainer(mode, tmp_path)
    go, done = threading.Event(), threading.Event()

    class OneStepAtATime(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            go.wait()
            go.clear()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            done.set()

    def one_step() -> None:
        done.clear()
        go.set()
        if not done.wait(timeout=600):
            raise TimeoutError("TRL step did not finish within 10 minutes")

    trainer.add_callback(OneStepAtATime())
    errors: list[BaseException] = []

    def train() -> None:
        try:
            trainer.train()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            done.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    one_step()  # warm-up step
    _reset_peak_rss()
    cpu = CpuClock()
    benchmark.pedantic(cpu.timed(one_step), rounds=ROUNDS, iterations=1)
    peak = _peak_rss_mib()
    thread.join(timeout=600)
    if errors:
        raise errors[0]
    _report(f"trl {mode}", benchmark, peak, cpu)
