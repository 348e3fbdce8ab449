"""Helpers shared by the end-to-end tests: ``write_config`` (a tiny run in ``tmp_path``), the
recording client wrappers around the local backend, and small readers of a run's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from tinker import types

from sdft.clients import resolve
from sdft.config import load_config
from sdft.loop import train
from sdft.runlog import RunLog

TINY = "sdft/tiny-random"

CAPITALS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Peru?", "Lima"),
]


def write_config(
    tmp_path: Path,
    *,
    kind: str = "sdft",
    params: dict[str, Any] | None = None,
    benchmarks: list[dict[str, Any]] | None = None,
    name: str = "config.yaml",
    output_dir: str = "out",
    seed: int = 0,
) -> Path:
    """A tiny run: 5 capitals, batch 2, 3 steps, 8-token completions, full fine-tuning of the tiny
    random model on CPU; benchmark ``val`` every 2 steps and ``final`` once after training."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps({"inputs": {"question": q}, "expected": f"The capital is {a}."}) + "\n"
            for q, a in CAPITALS
        )
    )
    for bench, rows in {
        "val": [("Capital of France?", "Paris"), ("Capital of Japan?", "Tokyo")],
        "final": [("Capital of Italy?", "Rome")],
    }.items():
        (data / bench).mkdir(exist_ok=True)
        (data / bench / "tasks.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "task_id": f"{bench}_{i}",
                        "instruction": q,
                        "verifier": {"kind": "in_process", "fn_name": "contains", "expected": a},
                    }
                )
                + "\n"
                for i, (q, a) in enumerate(rows)
            )
        )
    run_params: dict[str, Any] = {
        "learning_rate": 1e-3,
        "max_steps": 3,
        "batch_size": 2,
        "group_size": 1,
        "lora_rank": None,
        "topk": 5,
        "skip_first_n": 1,
        "max_tokens": 8,
        "max_context_length": 256,
        "save_every": 2,
    }
    if kind == "sft":
        for key in ("topk", "skip_first_n", "group_size"):
            run_params.pop(key)
    run_params.update(params or {})
    if benchmarks is None:
        benchmarks = [
            {"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]},
            {"name": "final", "path": "data/final", "split": "test", "max_tokens": 4},
        ]
    config = {
        "model": {"name": TINY},
        "backend": {"kind": "local", "device": "cpu"},
        "algorithm": {"kind": kind, "params": run_params},
        "data": {"source_kind": "jsonl", "path": "data/train.jsonl"},
        "metadata": {"benchmark": benchmarks},
        "output_dir": output_dir,
        "seed": seed,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- recording wrappers around the local backend ---------------------------------------------


class Recorder:
    """What the loop asked of the backend, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.forward_backward: list[tuple[list[types.Datum], str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.created: list[tuple[str, tuple, dict]] = []


class RecordingFuture:
    def __init__(self, inner: Any, label: str, recorder: Recorder, wrap=None) -> None:
        self.inner, self.label, self.recorder, self.wrap = inner, label, recorder, wrap

    def _finish(self, value: Any) -> Any:
        return self.wrap(value) if self.wrap else value

    async def result_async(self, timeout: float | None = None) -> Any:
        self.recorder.events.append(("await", self.label))
        return self._finish(await resolve(self.inner))

    def result(self, timeout: float | None = None) -> Any:
        self.recorder.events.append(("await", self.label))
        value = self.inner.result() if hasattr(self.inner, "result") else self.inner
        return self._finish(value)

    def __await__(self):
        return self.result_async().__await__()


class RecordingSampler:
    def __init__(self, inner: Any, recorder: Recorder, role: str) -> None:
        self.inner, self.recorder, self.role = inner, recorder, role

    def sample(
        self,
        prompt,
        num_samples,
        sampling_params,
        include_prompt_logprobs=False,
        topk_prompt_logprobs=0,
        **kwargs,
    ):
        self.recorder.samples.append(
            {
                "role": self.role,
                "prompt": prompt,
                "num_samples": num_samples,
                "sampling_params": sampling_params,
                "include_prompt_logprobs": include_prompt_logprobs,
                "topk_prompt_logprobs": topk_prompt_logprobs,
                "prompt_logprobs_last_n": kwargs.get("prompt_logprobs_last_n"),
            }
        )
        self.recorder.events.append(("submit", f"sample:{self.role}"))
        future = self.inner.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            **kwargs,
        )
        return RecordingFuture(future, f"sample:{self.role}", self.recorder)

    def compute_logprobs(self, prompt, **kwargs):
        self.recorder.events.append(("submit", f"compute_logprobs:{self.role}"))
        return RecordingFuture(
            self.inner.compute_logprobs(prompt, **kwargs),
            f"compute_logprobs:{self.role}",
            self.recorder,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RecordingTrainer:
    def __init__(self, inner: Any, recorder: Recorder) -> None:
        self.inner, self.recorder = inner, recorder

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.recorder.forward_backward.append((data, loss_fn, loss_fn_config))
        self.recorder.events.append(("submit", "forward_backward"))
        future = self.inner.forward_backward(data, loss_fn, loss_fn_config)
        return RecordingFuture(future, "forward_backward", self.recorder)

    def forward_backward_custom(self, data, loss_fn, **kwargs):
        self.recorder.forward_backward.append((data, "custom", loss_fn))
        self.recorder.events.append(("submit", "forward_backward"))
        future = self.inner.forward_backward_custom(data, loss_fn, **kwargs)
        return RecordingFuture(future, "forward_backward", self.recorder)

    def forward_backward_full_kl(self, data, teacher, *args, **kwargs):
        self.recorder.forward_backward.append((data, "full_kl", None))
        self.recorder.events.append(("submit", "forward_backward"))
        inner_teacher = teacher.inner if isinstance(teacher, RecordingSampler) else teacher
        future = self.inner.forward_backward_full_kl(data, inner_teacher, *args, **kwargs)
        return RecordingFuture(future, "forward_backward", self.recorder)

    def optim_step(self, *args, **kwargs):
        self.recorder.events.append(("submit", "optim_step"))
        return RecordingFuture(self.inner.optim_step(*args, **kwargs), "optim_step", self.recorder)

    def save_weights_and_get_sampling_client(self, *args, **kwargs):
        future = self.inner.save_weights_and_get_sampling_client(*args, **kwargs)
        return RecordingFuture(
            future,
            "refresh",
            self.recorder,
            lambda c: RecordingSampler(c, self.recorder, "student"),
        )

    def create_ema_sampling_client(self, *args, **kwargs):
        future = self.inner.create_ema_sampling_client(*args, **kwargs)
        return RecordingFuture(
            future, "ema", self.recorder, lambda c: RecordingSampler(c, self.recorder, "teacher")
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RecordingService:
    def __init__(self, inner: Any, recorder: Recorder) -> None:
        self.inner, self.recorder = inner, recorder

    def _training(self, method: str, *args, **kwargs):
        self.recorder.created.append((method, args, kwargs))
        future = getattr(self.inner, method)(*args, **kwargs)
        return RecordingFuture(
            future, method, self.recorder, lambda c: RecordingTrainer(c, self.recorder)
        )

    def create_lora_training_client(self, *args, **kwargs):
        return self._training("create_lora_training_client", *args, **kwargs)

    def create_full_training_client(self, *args, **kwargs):
        return self._training("create_full_training_client", *args, **kwargs)

    def create_training_client_from_state_with_optimizer(self, *args, **kwargs):
        return self._training("create_training_client_from_state_with_optimizer", *args, **kwargs)

    def create_sampling_client(self, *args, **kwargs):
        self.recorder.created.append(("create_sampling_client", args, kwargs))
        role = "teacher" if kwargs.get("base_model") or "teacher" in str(kwargs) else "student"
        future = self.inner.create_sampling_client(*args, **kwargs)
        return RecordingFuture(
            future,
            "create_sampling_client",
            self.recorder,
            lambda c: RecordingSampler(c, self.recorder, role),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def local_service(config) -> Any:
    from sdft.loop import build_service_client

    return build_service_client(config)


def recorded_run(config_path: Path, **kwargs) -> tuple[Recorder, Any]:
    config = load_config(config_path)
    recorder = Recorder()
    result = train(
        config,
        service_client=RecordingService(local_service(config), recorder),
        progress=False,
        **kwargs,
    )
    return recorder, result


def rows_of(output_dir: Path) -> list[dict[str, Any]]:
    return RunLog(output_dir).read_metrics()
