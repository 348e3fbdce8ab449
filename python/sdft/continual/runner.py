"""Running an experiment: base scores, chains of stages, resume, ``--parallel``, ``results.jsonl``.

Layout of ``output_dir``::

    base/scores.json, base/predictions/<benchmark>.jsonl      the base model, scored once
    runs/<method>/lr<lr>/seed<seed>/stage<k>-<name>/          one training run (sdft train's outputs)
        start.json                                            what the stage started from
        scores.json, predictions/final.<benchmark>.jsonl      its final checkpoint, scored
    checkpoints/                                              local backend checkpoint files
    results.jsonl, results.md, tradeoff.png, stages.png

A stage counts as done when its ``scores.json`` exists (written atomically after the scoring).
Run again after a crash or ``kill -9``: done stages are skipped, an interrupted training run resumes
from its last checkpoint (``sdft train --resume``), and ``results.jsonl`` is rebuilt from the
``scores.json`` files, so every (method, lr, seed, stage, benchmark, metric) appears exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft import _atomic
from sdft import checkpoints as ckpt
from sdft.config import field_default
from sdft.continual.claims import Claim, holding, lock_name
from sdft.continual.scoring import LoadedTasks, Scores, load_tasks, score_model
from sdft.continual.spec import Chain, Experiment, StageRun
from sdft.drift import load_drift_prompts

RESULTS_NAME = "results.jsonl"
SCORES_NAME = "scores.json"
RESULTS_LOCK = "results"
START_NAME = "start.json"


class ExperimentFailed(RuntimeError):
    """One or more chains failed; the others ran to the end and their results are written."""


async def _resolve(value: Any) -> Any:
    if hasattr(value, "result_async"):
        return await value.result_async()
    if asyncio.isfuture(value) or asyncio.iscoroutine(value):
        return await value
    return value


class StageStartService:
    """A service client whose base model is a checkpoint: the start of a continual stage.

    New training clients (LoRA or full) load the checkpoint's weights with a fresh optimizer
    (``create_training_client_from_state``); a base-model sampling client — the SDFT teacher — is
    the sampler saved with it when ``teacher_path`` is given. Everything else (resuming a run from
    its own checkpoint, samplers of saved paths) goes to the wrapped client unchanged."""

    def __init__(self, inner: Any, state_path: str, teacher_path: str | None) -> None:
        self.inner = inner
        self.state_path = state_path
        self.teacher_path = teacher_path

    def create_lora_training_client(self, base_model: str, *args: Any, **kwargs: Any) -> Any:
        return self.inner.create_training_client_from_state(self.state_path)

    def create_full_training_client(self, base_model: str, *args: Any, **kwargs: Any) -> Any:
        return self.inner.create_training_client_from_state(self.state_path)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **kwargs: Any
    ) -> Any:
        if model_path is None and self.teacher_path is not None:
            return self.inner.create_sampling_client(model_path=self.teacher_path)
        return self.inner.create_sampling_client(
            model_path=model_path, base_model=base_model, **kwargs
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class ExperimentResult:
    output_dir: Path
    trained: list[str] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # chains (and "base") another process was running: left to it
    elsewhere: list[str] = field(default_factory=list)


def load_inputs(experiment: Experiment) -> dict[str, LoadedTasks]:
    """Load every stage's training data and every benchmark: a bad file fails here, before any
    training. Returns the loaded task benchmarks (reused for scoring)."""
    from sdft.datasets import load_examples

    seen: set[tuple[str, str]] = set()
    for run in experiment.runs.values():
        data = run.config.data
        key = (str(data.path), json.dumps(data.fields, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        examples = load_examples(
            data.path, source_kind=data.source_kind, fields=data.fields, split=data.split
        )
        if not examples:
            raise ValueError(f"stage {run.stage.name}: no training examples in {data.path}")
    loaded: dict[str, LoadedTasks] = {}
    for spec in experiment.benchmarks:
        if spec.kind == "drift":
            load_drift_prompts(spec.path, limit=spec.limit)
        else:
            loaded[spec.name] = load_tasks(spec)
    return loaded


def read_scores(directory: Path) -> dict[str, Any] | None:
    path = directory / SCORES_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def result_rows(experiment: Experiment) -> list[dict[str, Any]]:
    """Every score on disk as ``results.jsonl`` rows: the base model (stage 0), then each chain's
    stages in order."""
    rows: list[dict[str, Any]] = []
    base = read_scores(experiment.output_dir / "base")
    if base is not None:
        for benchmark, metrics in base["metrics"].items():
            for metric, value in metrics.items():
                rows.append(
                    {
                        "method": "base",
                        "learning_rate": None,
                        "seed": None,
                        "stage": 0,
                        "stage_name": "base",
                        "benchmark": benchmark,
                        "metric": metric,
                        "value": value,
                    }
                )
    for chain in experiment.chains:
        for run in experiment.stage_runs(chain):
            scores = read_scores(run.output_dir)
            if scores is None:
                continue
            for benchmark, metrics in scores["metrics"].items():
                for metric, value in metrics.items():
                    rows.append(
                        {
                            "method": chain.method,
                            "learning_rate": chain.learning_rate,
                            "seed": chain.seed,
                            "stage": run.index,
                            "stage_name": run.stage.name,
                            "benchmark": benchmark,
                            "metric": metric,
                            "value": value,
                        }
                    )
    return rows


def _rebuild_results(experiment: Experiment) -> Path:
    path = experiment.output_dir / RESULTS_NAME
    rows = result_rows(experiment)
    _atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_results(experiment: Experiment) -> Path:
    """Rebuild ``results.jsonl`` from every ``scores.json`` on disk."""
    with holding(experiment.output_dir, RESULTS_LOCK):
        return _rebuild_results(experiment)


def write_outputs(experiment: Experiment) -> list[Path]:
    """``results.jsonl`` and the reports, rebuilt together from what is on disk, under the lock
    that makes the last of several processes write the complete ones."""
    from sdft.continual.report import write_reports

    with holding(experiment.output_dir, RESULTS_LOCK):
        return [_rebuild_results(experiment), *write_reports(experiment)]


def _write_scores(directory: Path, scores: Scores, extra: dict[str, Any]) -> None:
    for name, rows in scores.predictions.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        _atomic.write_text(directory / "predictions" / f"final.{name}.jsonl", text)
    _atomic.write_json(directory / SCORES_NAME, {**extra, "metrics": scores.metrics})


def _final_checkpoint(run: StageRun) -> ckpt.CheckpointRecord | None:
    record = ckpt.last_checkpoint(run.output_dir)
    if record is None or record.step < run.config.params.max_steps:
        return None
    return record


def build_experiment_service(experiment: Experiment) -> Any:
    """One service client for every run: local checkpoints live in ``output_dir/checkpoints``."""
    config = experiment.base_config
    if config.backend.kind == "tinker":
        from sdft.loop import build_service_client

        return build_service_client(config)
    from sdft.backends.local import LocalServiceClient

    return LocalServiceClient(
        checkpoint_root=experiment.output_dir / "checkpoints",
        device=config.backend.device,
        dtype=config.backend.dtype,
    )


class ExperimentRunner:
    """Runs (or resumes) an experiment; ``parallel`` chains at a time."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        parallel: int = 1,
        service_client: Any = None,
        log: Callable[[str], None] | None = None,
        reports: bool = True,
    ) -> None:
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {parallel}")
        self.experiment = experiment
        self.parallel = parallel
        self.service = service_client
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.reports = reports
        self.result = ExperimentResult(experiment.output_dir)
        self.base_sampler: Any = None
        self.tokenizer: Any = None
        self.loaded: dict[str, LoadedTasks] = {}

    async def run(self) -> ExperimentResult:
        experiment = self.experiment
        self.loaded = load_inputs(experiment)
        experiment.output_dir.mkdir(parents=True, exist_ok=True)
        if self.service is None:
            self.service = build_experiment_service(experiment)
        name = experiment.base_config.model.name
        self.base_sampler = await _resolve(self.service.create_sampling_client(base_model=name))
        self.tokenizer = _tokenizer(name, self.base_sampler)
        await self._score_base()
        write_results(experiment)

        gate = asyncio.Semaphore(self.parallel)

        async def guarded(chain: Chain) -> None:
            async with gate:
                claim = Claim(experiment.output_dir, lock_name(chain.label))
                if not claim.take():
                    self.result.elsewhere.append(chain.label)
                    self.log(f"{chain.label}: run by {claim.holder()}; left to it")
                    claim.release()
                    return
                try:
                    await self._run_chain(chain)
                finally:
                    claim.release()

        outcomes = await asyncio.gather(
            *(guarded(chain) for chain in experiment.chains), return_exceptions=True
        )
        for chain, outcome in zip(experiment.chains, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                self.result.failed[chain.label] = f"{type(outcome).__name__}: {outcome}"
        if self.reports:
            write_outputs(experiment)
        else:
            write_results(experiment)
        if self.result.failed:
            lines = "; ".join(f"{label}: {error}" for label, error in self.result.failed.items())
            raise ExperimentFailed(f"{len(self.result.failed)} chain(s) failed: {lines}")
        return self.result

    async def _score_base(self) -> None:
        directory = self.experiment.output_dir / "base"
        if read_scores(directory) is not None:
            self.result.skipped.append("base")
            return
        claim = Claim(self.experiment.output_dir, "base")
        if not claim.take():
            self.result.elsewhere.append("base")
            self.log(f"base: scored by {claim.holder()}; left to it")
            claim.release()
            return
        try:
            if read_scores(directory) is not None:  # scored while this process started
                self.result.skipped.append("base")
                return
            await self._score_base_now(directory)
        finally:
            claim.release()

    async def _score_base_now(self, directory: Path) -> None:
        started = time.perf_counter()
        scores = await score_model(
            self.base_sampler,
            self.base_sampler,
            self.tokenizer,
            self.experiment.benchmarks,
            self.experiment.base_config,
            seed=self.experiment.base_config.seed,
            loaded=self.loaded,
        )
        _write_scores(directory, scores, {"label": "base", "stage": 0})
        self.result.scored.append("base")
        self.log(f"base: {_shown(scores)} ({time.perf_counter() - started:.0f} s)")

    async def _run_chain(self, chain: Chain) -> None:
        from sdft.loop import train_async

        previous: ckpt.CheckpointRecord | None = None
        for run in self.experiment.stage_runs(chain):
            stored = read_scores(run.output_dir)
            if stored is not None:
                changed = _changed_keys(stored.get("config"), _fingerprint(run))
                if changed:
                    raise RuntimeError(
                        f"{run.label} was trained and scored with another config "
                        f"({', '.join(changed)} changed); delete {run.output_dir} to redo it or "
                        "use another output_dir"
                    )
                self.result.skipped.append(run.label)
                previous = _final_checkpoint(run)
                if previous is None:
                    raise RuntimeError(f"{run.label}: scored but has no final checkpoint")
                continue
            service = self.service
            start: dict[str, Any] = {
                "stage": run.index,
                "from": "base",
                "model": run.config.model.name,
            }
            if previous is not None:
                teacher = (
                    previous.sampler_path if self.experiment.spec.teacher == "stage_start" else None
                )
                service = StageStartService(self.service, previous.state_path or "", teacher)
                start = {
                    "stage": run.index,
                    "from": "checkpoint",
                    "state_path": previous.state_path,
                    "sampler_path": previous.sampler_path,
                    "teacher": teacher or "base model",
                }
            record = _final_checkpoint(run)
            if record is None:
                _atomic.write_json(run.output_dir / START_NAME, start)
                started = time.perf_counter()
                self.log(f"{run.label}: training {run.config.params.max_steps} steps")
                await train_async(
                    run.config,
                    resume=True,
                    service_client=service,
                    progress=False,
                    teacher_check=self.experiment.spec.teacher_check_examples,
                )
                self.result.trained.append(run.label)
                self.log(f"{run.label}: trained ({time.perf_counter() - started:.0f} s)")
                record = _final_checkpoint(run)
                if record is None or record.sampler_path is None:
                    raise RuntimeError(f"{run.label}: training ended without a final checkpoint")
            sampler = await _resolve(
                self.service.create_sampling_client(model_path=record.sampler_path)
            )
            scores = await score_model(
                sampler,
                self.base_sampler,
                self.tokenizer,
                self.experiment.benchmarks,
                self.experiment.base_config,
                seed=chain.seed,
                loaded=self.loaded,
            )
            _write_scores(
                run.output_dir,
                scores,
                {
                    "label": run.label,
                    "stage": run.index,
                    "checkpoint": record.sampler_path,
                    "config": _fingerprint(run),
                },
            )
            write_results(self.experiment)
            self.result.scored.append(run.label)
            self.log(f"{run.label}: {_shown(scores)}")
            previous = record


def _fingerprint(run: StageRun) -> dict[str, Any]:
    """What a scored stage depends on: its resolved run config, less where it runs."""
    resolved = run.config.resolved_dict()
    resolved.pop("output_dir", None)
    backend = dict(resolved.get("backend", {}))
    for key in ("device", "base_url", "checkpoint_root"):
        backend.pop(key, None)
    resolved["backend"] = backend
    return resolved


_ABSENT = object()


def _changed_keys(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Key paths whose values differ between a scored stage's stored fingerprint and its config now.

    A key the stored fingerprint lacks was added to the config after that stage was scored; it is
    no change when the config now holds the key's default, which is what that stage ran with."""
    if old is None and not path:
        return []
    if old is _ABSENT and new is not _ABSENT and new == field_default(path):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            changed += _changed_keys(old.get(key, _ABSENT), new.get(key, _ABSENT), (*path, key))
        return changed
    return [".".join(path)] if old != new else []


def _tokenizer(name: str, sampler: Any) -> Any:
    """The model's tokenizer from the local resolution (embedded, local or cached models, offline),
    else from the sampling client (Tinker's SDK fetches it from the Hugging Face hub)."""
    from sdft.models import ModelNotFoundError, load_tokenizer

    try:
        return load_tokenizer(name)
    except (ModelNotFoundError, OSError, ValueError):
        return sampler.get_tokenizer()


def _shown(scores: Scores) -> str:
    return ", ".join(
        f"{benchmark} {metric} {value:.3f}"
        for benchmark, metrics in scores.metrics.items()
        for metric, value in metrics.items()
    )


def run_experiment(
    experiment: Experiment,
    *,
    parallel: int = 1,
    service_client: Any = None,
    log: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run or resume ``experiment`` (see the module doc); raises :class:`ExperimentFailed` after
    writing every result when a chain fails."""
    runner = ExperimentRunner(experiment, parallel=parallel, service_client=service_client, log=log)
    return asyncio.run(runner.run())


__all__ = [
    "ExperimentFailed",
    "ExperimentResult",
    "ExperimentRunner",
    "StageStartService",
    "load_inputs",
    "result_rows",
    "run_experiment",
    "write_outputs",
    "write_results",
]
