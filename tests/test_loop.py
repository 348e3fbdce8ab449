"""The training loop end to end on the tiny random model (local backend), and its parts."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sdft.checkpoints import CheckpointRecord, read_checkpoints
from sdft.config import TeacherSection, load_config
from sdft.loop import (
    DivergedError,
    RunDirectoryError,
    RunResult,
    Trainer,
    learning_rate_at,
    load_dataset,
    prepare_output_dir,
    split_evenly,
    train,
)
from sdft.objectives import (
    FullVocabularyKL,
    ImportanceSampling,
    TopKCrossEntropy,
    TopKReverseKL,
    objective_for,
)
from sdft.teachers import EmaTeacher, StaticTeacher, SyncTeacher, teacher_policy
from support import (
    CAPITALS,
    TINY,
    Recorder,
    RecordingService,
    RecordingTrainer,
    local_service,
    recorded_run,
    rows_of,
    write_config,
)

# --- pure helpers -----------------------------------------------------------------------------


def test_split_evenly() -> None:
    assert split_evenly([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_evenly([1, 2, 3], 5) == [[1], [2], [3]]
    assert split_evenly([1, 2, 3, 4], 1) == [[1, 2, 3, 4]]


def test_learning_rate_schedules(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 4, "learning_rate": 1.0}))
    assert [learning_rate_at(config, s) for s in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 1.0]
    config.algorithm.params.lr_schedule = "linear"
    assert [learning_rate_at(config, s) for s in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    config.algorithm.params.lr_schedule = "cosine"
    values = [learning_rate_at(config, s) for s in (1, 3)]
    assert values[0] == 1.0 and math.isclose(values[1], 0.5, abs_tol=1e-12)


def test_dataset_batches_cover_max_steps_and_are_deterministic(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 7, "batch_size": 2}))
    first, again = load_dataset(config), load_dataset(config)
    assert len(first) >= 7
    for index in range(7):
        assert first.get_batch(index).questions == again.get_batch(index).questions
    epoch = [q for i in range(3) for q in first.get_batch(i).questions]
    assert sorted(epoch) == sorted(q for q, _ in CAPITALS)


# --- end to end -------------------------------------------------------------------------------


def test_sdft_run_writes_every_output(tmp_path: Path) -> None:
    recorder, result = recorded_run(write_config(tmp_path))
    out = tmp_path / "out"
    assert result.status == "completed" and result.steps_completed == 3
    rows = rows_of(out)
    assert [
        (r["step"], r["split"], sorted(r["metrics"])) for r in rows if r["split"] != "train"
    ] == [
        (0, "val", ["val/val/pass@1"]),
        (2, "val", ["val/val/pass@1"]),
        (3, "val", ["val/val/pass@1"]),
        (3, "test", ["test/final/pass@1"]),
    ]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    # 5 examples in batches of 2: the epoch's last batch holds one.
    assert [r["metrics"]["train/num_sequences"] for r in train_rows] == [2, 2, 1]
    for row in train_rows:
        metrics = row["metrics"]
        distilled = metrics["train/distilled_tokens"]
        assert 0 < distilled <= metrics["train/completion_tokens"] <= 16
        assert math.isclose(metrics["train/mean_loss"] * distilled, metrics["train/loss_sum"])
        assert metrics["train/mean_loss"] > 0
        assert metrics["train/teacher_entropy"] == metrics["sdft/mean_teacher_entropy_distilled"]
        assert metrics["train/learning_rate"] == 1e-3
        for key in ("time/sample_s", "time/teacher_s", "time/train_s", "time/refresh_s"):
            assert metrics[key] >= 0
    assert result.train_metrics == train_rows[-1]["metrics"]
    assert set(result.benchmark_metrics) == {"val/val/pass@1", "test/final/pass@1"}

    for name in ("config.resolved.yaml", "summary.md", "plot.png", "checkpoints.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "final.jsonl",
        "final.step3.jsonl",
        "val.jsonl",
        "val.step0.jsonl",
        "val.step2.jsonl",
        "val.step3.jsonl",
    ]
    prediction = json.loads((out / "predictions" / "val.jsonl").read_text().splitlines()[0])
    assert prediction["task_id"] == "val_0" and isinstance(prediction["correct"], bool)
    summary = (out / "summary.md").read_text()
    assert "- Status: **completed**" in summary and "- Steps: 3 / 3" in summary
    assert [(c.name, c.step, c.final) for c in read_checkpoints(out)] == [
        ("000002", 2, False),
        ("000003", 3, True),
    ]
    # Every loss request went out without the student datums' mask.
    assert [call[1] for call in recorder.forward_backward] == ["cross_entropy"] * 3
    for data, _, _ in recorder.forward_backward:
        assert all(set(d.loss_fn_inputs) == {"target_tokens", "weights"} for d in data)


def test_teacher_requests_score_prompt_plus_completion_all_in_flight(tmp_path: Path) -> None:
    """Gathered (``streaming: false``), where the requests of a phase leave together and in batch
    order; the streamed step sends the same requests (tests/test_schedules.py)."""
    config_path = write_config(
        tmp_path,
        params={"max_steps": 1, "group_size": 2, "topk": 4, "streaming": False},
        benchmarks=[],
    )
    recorder, _ = recorded_run(config_path)
    student = [s for s in recorder.samples if s["role"] == "student"]
    teacher = [s for s in recorder.samples if s["role"] == "teacher"]
    assert len(student) == 2 and all(s["num_samples"] == 2 for s in student)
    assert all(s["sampling_params"].max_tokens == 8 for s in student)
    assert len(teacher) == 4
    for request in teacher:
        assert request["include_prompt_logprobs"] is True
        assert request["topk_prompt_logprobs"] == 4
        assert request["sampling_params"].max_tokens == 1
    # All requests of a phase are submitted before the first one is awaited.
    kinds = [e for e in recorder.events if e[1].startswith("sample:teacher")]
    assert kinds[:4] == [("submit", "sample:teacher")] * 4
    kinds = [e for e in recorder.events if e[1].startswith("sample:student")]
    assert kinds[:2] == [("submit", "sample:student")] * 2

    # The teacher sees teacher prompt + the student's completion, row for row.
    config = load_config(config_path)
    trainer = Trainer(config, None, progress=False)
    from sdft.models import load_tokenizer

    trainer.tokenizer = load_tokenizer(TINY)
    batch = load_dataset(config).get_batch(0)
    data, _, _ = recorder.forward_backward[0]
    for index, request in enumerate(teacher):
        example = batch.examples[index // 2]
        prefix = trainer._teacher_prompt(example.question, example.golden_answer, None).to_ints()
        tokens = request["prompt"].to_ints()
        assert tokens[: len(prefix)] == prefix
        completion = tokens[len(prefix) :]
        # Only the completion rows are scored: the teacher prompt's rows are never used.
        assert request["prompt_logprobs_last_n"] == len(completion)
        student_prompt = trainer._student_prompt(example.question, None).to_ints()
        assert data[index].model_input.to_ints() == (student_prompt + completion)[:-1]


def test_truncation_to_max_context_length(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    from sdft.models import load_tokenizer

    trainer = Trainer(config, None, progress=False)
    trainer.tokenizer = load_tokenizer(TINY)
    q, a = CAPITALS[0]
    teacher_len = trainer._teacher_prompt(q, f"The capital is {a}.", None).length
    config_path = write_config(
        tmp_path,
        params={"max_steps": 1, "max_tokens": 8, "max_context_length": teacher_len + 3},
        benchmarks=[],
    )
    recorder, _ = recorded_run(config_path)
    teacher = [s for s in recorder.samples if s["role"] == "teacher"]
    assert teacher and all(s["prompt"].length <= teacher_len + 3 for s in teacher)
    row = rows_of(tmp_path / "out")[0]["metrics"]
    assert row["train/truncated"] >= 1
    assert row["sdft/teacher_truncated_count"] == row["train/truncated"]


def test_forward_backward_and_optim_step_are_pipelined(tmp_path: Path) -> None:
    """Gathered (``streaming: false``): the cookbook's one-ahead pipelining of the substeps."""
    recorder, _ = recorded_run(
        write_config(
            tmp_path,
            params={"max_steps": 1, "batch_size": 3, "num_substeps": 3, "streaming": False},
            benchmarks=[],
        )
    )
    train_events = [e for e in recorder.events if e[1] in ("forward_backward", "optim_step")]
    S, A = "submit", "await"
    assert train_events == [
        (S, "forward_backward"), (S, "optim_step"), (S, "forward_backward"), (S, "optim_step"),
        (A, "forward_backward"), (A, "optim_step"),
        (S, "forward_backward"), (S, "optim_step"),
        (A, "forward_backward"), (A, "optim_step"), (A, "forward_backward"), (A, "optim_step"),
    ]  # fmt: skip
    assert [len(call[0]) for call in recorder.forward_backward] == [1, 1, 1]


def test_streamed_substeps_are_all_submitted_before_any_is_awaited(tmp_path: Path) -> None:
    """Streamed (the default): each substep goes out as soon as its datums are built, in batch
    order, so all three are in flight before the first result is awaited."""
    recorder, _ = recorded_run(
        write_config(
            tmp_path,
            params={"max_steps": 1, "batch_size": 3, "num_substeps": 3},
            benchmarks=[],
        )
    )
    train_events = [e for e in recorder.events if e[1] in ("forward_backward", "optim_step")]
    S, A = "submit", "await"
    assert train_events == [
        (S, "forward_backward"), (S, "optim_step"), (S, "forward_backward"), (S, "optim_step"),
        (S, "forward_backward"), (S, "optim_step"),
        (A, "forward_backward"), (A, "optim_step"), (A, "forward_backward"), (A, "optim_step"),
        (A, "forward_backward"), (A, "optim_step"),
    ]  # fmt: skip
    assert [len(call[0]) for call in recorder.forward_backward] == [1, 1, 1]


@pytest.mark.parametrize(
    ("params", "loss_fn", "keys"),
    [
        ({"loss": "reverse_kl"}, "custom", {"target_tokens", "weights"}),
        ({"topk": 0}, "importance_sampling", {"target_tokens", "logprobs", "advantages"}),
        ({"lora_rank": 4, "learning_rate": 1e-2}, "cross_entropy", {"target_tokens", "weights"}),
        ({"generate_from_teacher": True}, "cross_entropy", {"target_tokens", "weights"}),
    ],
    ids=["reverse_kl", "importance_sampling", "lora", "generate_from_teacher"],
)
def test_loss_variants_train(tmp_path: Path, params, loss_fn, keys) -> None:
    recorder, result = recorded_run(
        write_config(tmp_path, params={"max_steps": 2, "save_every": None, **params}, benchmarks=[])
    )
    assert result.steps_completed == 2
    assert [call[1] for call in recorder.forward_backward] == [loss_fn, loss_fn]
    for data, _, _ in recorder.forward_backward:
        assert all(set(d.loss_fn_inputs) == keys for d in data)
    for row in rows_of(tmp_path / "out"):
        metrics = row["metrics"]
        assert math.isfinite(metrics["train/loss_sum"])
        if metrics["train/distilled_tokens"]:
            assert math.isclose(
                metrics["train/mean_loss"] * metrics["train/distilled_tokens"],
                metrics["train/loss_sum"],
            )


def test_generate_from_teacher_samples_the_teacher_prompt(tmp_path: Path) -> None:
    recorder, _ = recorded_run(
        write_config(
            tmp_path, params={"max_steps": 1, "generate_from_teacher": True}, benchmarks=[]
        )
    )
    rollout_prompts = [s["prompt"].to_ints() for s in recorder.samples if s["role"] == "student"]
    scored = [s["prompt"].to_ints() for s in recorder.samples if s["role"] == "teacher"]
    # Each teacher-forced sequence extends the prompt its completion was sampled from (the
    # teacher prompt); the streamed step scores in arrival order, so match by prefix.
    matches = [
        [i for i, prompt in enumerate(rollout_prompts) if sequence[: len(prompt)] == prompt]
        for sequence in scored
    ]
    assert sorted(m[0] for m in matches if len(m) == 1) == list(range(len(rollout_prompts)))


def test_full_kl_and_ema_teacher(tmp_path: Path) -> None:
    _, result = recorded_run(
        write_config(
            tmp_path,
            params={
                "max_steps": 2,
                "loss": "full_kl",
                "teacher": {"mode": "ema", "ema_alpha": 0.5},
                "save_every": None,
            },
            benchmarks=[],
        )
    )
    rows = rows_of(tmp_path / "out")
    assert result.steps_completed == 2 and len(rows) == 2
    for row in rows:
        assert row["metrics"]["train/loss_sum"] >= 0


def test_sync_teacher_is_saved_and_recorded_in_checkpoints(tmp_path: Path) -> None:
    recorder, _ = recorded_run(
        write_config(
            tmp_path,
            params={"max_steps": 3, "teacher": {"mode": "sync", "sync_every": 2}, "save_every": 1},
            benchmarks=[],
        )
    )
    records = read_checkpoints(tmp_path / "out")
    assert [r.step for r in records] == [1, 2, 3]
    assert "teacher_path" not in records[0].extra
    assert records[1].extra["teacher_path"] == records[2].extra["teacher_path"]
    assert records[1].extra["teacher_path"].endswith("teacher-000002")
    model_paths = [
        kw.get("model_path") for m, _, kw in recorder.created if m == "create_sampling_client"
    ]
    assert records[1].extra["teacher_path"] in model_paths


def test_sft_datum_trains_exactly_the_answer_tokens(tmp_path: Path) -> None:
    from sdft.models import load_tokenizer

    config = load_config(write_config(tmp_path, kind="sft"))
    trainer = Trainer(config, None, progress=False)
    trainer.tokenizer = tokenizer = load_tokenizer(TINY)
    datum = trainer.sft_datum("What is the capital of Peru?", "Lima", None)
    prompt = trainer._student_prompt("What is the capital of Peru?", None).to_ints()
    answer = [*tokenizer.encode("Lima", add_special_tokens=False), tokenizer.eos_token_id]
    sequence = prompt + answer
    assert datum.model_input.to_ints() == sequence[:-1]
    assert datum.loss_fn_inputs["target_tokens"].to_numpy().tolist() == sequence[1:]
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    assert weights.tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    assert set(datum.loss_fn_inputs) == {"target_tokens", "weights"}


def test_sft_run(tmp_path: Path) -> None:
    recorder, result = recorded_run(write_config(tmp_path, kind="sft"))
    assert result.status == "completed"
    assert not [s for s in recorder.samples if s["role"] == "teacher"]
    rows = [r for r in rows_of(tmp_path / "out") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    losses = [r["metrics"]["train/mean_loss"] for r in rows]
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0]  # lr 1e-3 on the same 5 answers: the loss falls
    assert "sft (cross_entropy on golden answers)" in (tmp_path / "out" / "summary.md").read_text()


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    prepare_output_dir(config, resume=False, overwrite=False)
    (config.output_dir / "metrics.jsonl").write_text("")
    (config.output_dir / "keep.txt").write_text("mine")
    with pytest.raises(
        RunDirectoryError,
        match=r"already holds a run \(metrics.jsonl, config.resolved.yaml\); pass --resume to continue it or --overwrite",
    ):
        prepare_output_dir(config, resume=False, overwrite=False)
    with pytest.raises(RunDirectoryError, match="--resume and --overwrite exclude each other"):
        prepare_output_dir(config, resume=True, overwrite=True)
    prepare_output_dir(config, resume=False, overwrite=True)
    assert sorted(p.name for p in config.output_dir.iterdir()) == [
        "config.resolved.yaml",
        "keep.txt",
    ]


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    prepare_output_dir(config, resume=False, overwrite=False)
    changed = load_config(
        write_config(tmp_path, params={"max_steps": 5, "learning_rate": 0.5}, benchmarks=[])
    )
    with pytest.raises(
        RunDirectoryError,
        match=r"the config changed since the run started \(algorithm.params.learning_rate\)",
    ):
        prepare_output_dir(changed, resume=True, overwrite=False)
    longer = load_config(write_config(tmp_path, params={"max_steps": 5}, benchmarks=[]))
    assert prepare_output_dir(longer, resume=True, overwrite=False) is None


def test_nothing_is_trained_when_all_datums_are_empty(tmp_path: Path) -> None:
    """Completions no longer than skip_first_n (a model that stops early): no position carries
    signal; the step still completes and reports a null mean loss instead of dividing by zero.
    The config refuses skip_first_n >= max_tokens, so the run's params are set past that check
    to make every completion that short."""
    config = load_config(
        write_config(
            tmp_path, params={"max_steps": 1, "skip_first_n": 7, "save_every": None}, benchmarks=[]
        )
    )
    config.algorithm.params.__dict__["skip_first_n"] = 50
    result = train(config, service_client=local_service(config), progress=False)
    metrics = rows_of(tmp_path / "out")[0]["metrics"]
    assert metrics["train/distilled_tokens"] == 0
    assert metrics["train/mean_loss"] is None
    assert metrics["train/loss_sum"] == 0.0
    assert result.status == "completed"


def test_weights_of_topk_datums_are_teacher_distributions(tmp_path: Path) -> None:
    recorder, _ = recorded_run(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    for datum in recorder.forward_backward[0][0]:
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        sums = weights.sum(axis=1)
        used = sums > 0
        assert np.allclose(sums[used], 1.0, atol=1e-5)
        assert weights.shape[1] == 5


class NanLossTrainer(RecordingTrainer):
    """Reports a NaN ``loss:sum`` for the ``nan_at``-th forward-backward (a diverged step)."""

    def __init__(self, inner: Any, recorder: Recorder, nan_at: int) -> None:
        super().__init__(inner, recorder)
        self.nan_at = nan_at

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        future = super().forward_backward(data, loss_fn, loss_fn_config)
        if len(self.recorder.forward_backward) == self.nan_at:

            def diverged(output: Any) -> Any:
                output.metrics["loss:sum"] = float("nan")
                return output

            future.wrap = diverged
        return future


class NanLossService(RecordingService):
    def __init__(self, inner: Any, recorder: Recorder, nan_at: int) -> None:
        super().__init__(inner, recorder)
        self.nan_at = nan_at

    def _training(self, method: str, *args, **kwargs):
        future = super()._training(method, *args, **kwargs)
        future.wrap = lambda client: NanLossTrainer(client, self.recorder, self.nan_at)
        return future


def test_a_non_finite_loss_fails_the_run_naming_the_step(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path, params={"max_steps": 3, "save_every": 1}, benchmarks=[])
    )
    service = NanLossService(local_service(config), Recorder(), nan_at=2)
    with pytest.raises(
        DivergedError, match=r"^step 2: the loss is not finite \(train/loss_sum = nan\)"
    ):
        train(config, service_client=service, progress=False)
    out = config.output_dir
    summary = (out / "summary.md").read_text()
    assert "- Status: **failed**" in summary
    assert "- Error: DivergedError: step 2: the loss is not finite" in summary
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[1]["metrics"]["train/loss_sum"])
    assert [r.step for r in read_checkpoints(out)] == [1]

    allowed = load_config(
        write_config(
            tmp_path, params={"max_steps": 3, "save_every": 1}, benchmarks=[], output_dir="out2"
        )
    )
    service = NanLossService(local_service(allowed), Recorder(), nan_at=2)
    result = train(allowed, service_client=service, progress=False, allow_nan=True)
    assert result.status == "completed" and result.steps_completed == 3
    losses = [r["metrics"]["train/loss_sum"] for r in rows_of(allowed.output_dir)]
    assert math.isnan(losses[1]) and math.isfinite(losses[0]) and math.isfinite(losses[2])


def test_the_cli_flag_allow_nan_reaches_train(tmp_path: Path, monkeypatch) -> None:
    import sdft.loop
    from sdft.cli import main

    calls: list[dict[str, Any]] = []

    def fake_train(config, **kwargs):
        calls.append(kwargs)
        return RunResult("completed", 1, 1, config.output_dir)

    monkeypatch.setattr(sdft.loop, "train", fake_train)
    config = write_config(tmp_path, params={"max_steps": 1}, benchmarks=[])
    assert main(["train", str(config), "--no-progress"]) == 0
    assert main(["train", str(config), "--no-progress", "--allow-nan"]) == 0
    assert [call["allow_nan"] for call in calls] == [False, True]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, TopKCrossEntropy),
        ({"loss": "reverse_kl"}, TopKReverseKL),
        ({"topk": 0}, ImportanceSampling),
        ({"loss": "full_kl"}, FullVocabularyKL),
    ],
    ids=["cross_entropy", "reverse_kl", "topk_0", "full_kl"],
)
def test_one_objective_per_loss(tmp_path: Path, params, expected) -> None:
    config = load_config(write_config(tmp_path, params=params, benchmarks=[]))
    assert type(objective_for(config, None, None)) is expected


def test_teacher_policies_follow_the_student_as_configured() -> None:
    created: list[dict[str, Any]] = []
    saved: list[str] = []

    class Service:
        def create_sampling_client(self, **kwargs):
            created.append(kwargs)
            return f"sampler of {kwargs}"

    class Student:
        def save_weights_for_sampler(self, name):
            saved.append(name)
            return SimpleNamespace(path=f"local://run/sampler_weights/{name}")

        def create_ema_sampling_client(self, alpha):
            return f"ema {alpha}"

    async def exercise(policy, resume_from=None) -> dict[str, Any]:
        await policy.create(Student(), resume_from)
        for step in (1, 2, 3, 4):
            await policy.after_step(step, Student())
        return policy.checkpoint_extra()

    static = teacher_policy(TeacherSection(), Service(), "base")
    assert isinstance(static, StaticTeacher) and asyncio.run(exercise(static)) == {}
    assert (
        created == [{"base_model": "base"}] and static.client == "sampler of {'base_model': 'base'}"
    )

    sync = teacher_policy(TeacherSection(mode="sync", sync_every=2), Service(), "base")
    assert isinstance(sync, SyncTeacher)
    assert asyncio.run(exercise(sync)) == {
        "teacher_path": "local://run/sampler_weights/teacher-000004"
    }
    assert saved == ["teacher-000002", "teacher-000004"]
    assert created[-1] == {"model_path": "local://run/sampler_weights/teacher-000004"}
    record = CheckpointRecord("000004", 4, extra={"teacher_path": "local://run/sampler_weights/t"})
    resumed = teacher_policy(TeacherSection(mode="sync", sync_every=8), Service(), "base")
    assert asyncio.run(exercise(resumed, record)) == {
        "teacher_path": "local://run/sampler_weights/t"
    }
    assert created[-1] == {"model_path": "local://run/sampler_weights/t"}

    ema = teacher_policy(TeacherSection(mode="ema", ema_alpha=0.25), Service(), "base")
    assert isinstance(ema, EmaTeacher) and asyncio.run(exercise(ema)) == {}
    assert ema.client == "ema 0.25"
