"""The step schedules (sdft.schedules): the streamed step sends the gathered step's requests with
the same contents and trains the same datums in the same order, scores a question before the
batch is sampled, submits substeps and the sampler refresh as early as it can; the overlapped
sampling of the next batch is one step off-policy and recorded; StreamedTraining cuts the batch
exactly as split_evenly does."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tinker import types

from sdft.config import ConfigError, parse_config
from sdft.objectives import TopKCrossEntropy, merge_metrics, objective_for
from sdft.optimizer import StreamedTraining, split_evenly
from sdft.rollouts import QuestionPrompts, SamplingRound
from sdft.schedules import GatheredSchedule, StepHooks, StreamedSchedule, schedule_for
from support import recorded_run, rows_of, write_config

VOCAB = 64


class Value:
    """A Tinker-style future of a value that becomes available when ``ready`` is set."""

    def __init__(self, value: Any, ready: asyncio.Event | None = None, log: list | None = None,
                 label: str = "") -> None:  # fmt: skip
        self.value, self.ready, self.log, self.label = value, ready, log, label

    async def result_async(self, timeout: float | None = None) -> Any:
        if self.ready is not None:
            await self.ready.wait()
        if self.log is not None:
            self.log.append(("await", self.label))
        return self.value


class Sequence_:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.logprobs = [-0.25 - 0.01 * t for t in tokens]


class Response:
    def __init__(self, sequences: list[Sequence_]) -> None:
        self.sequences = sequences


class FakeStudent:
    """Completions derived from the prompt and seed; question ``i``'s response is released when
    ``gates[i]`` is set (all open by default)."""

    def __init__(self, log: list, gates: dict[int, asyncio.Event] | None = None) -> None:
        self.log, self.gates, self.requests = log, gates or {}, 0

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: Any) -> Value:
        index = self.requests
        self.requests += 1
        self.log.append(("sample", index))
        rng = random.Random(sampling_params.seed)
        sequences = [
            Sequence_([rng.randrange(3, VOCAB) for _ in range(rng.randrange(0 if index == 1 else 1, 9))])
            for _ in range(num_samples)
        ]  # fmt: skip
        return Value(Response(sequences), self.gates.get(index))


class FakeTeacher:
    """Top-3 rows derived from the teacher-forced tokens; records every request."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.requests: list[tuple[tuple[int, ...], dict[str, Any]]] = []
        self.scored = asyncio.Event()

    def _rows(self, tokens: list[int]) -> list[Any]:
        rows: list[Any] = [None]
        for position in range(1, len(tokens)):
            base = tokens[position - 1]
            rows.append([((base + j) % VOCAB, -0.5 * (j + 1) - 0.001 * position) for j in range(3)])
        return rows

    def sample(self, sequence: types.ModelInput, num_samples: int, sampling_params: Any,
               **kwargs: Any) -> Value:  # fmt: skip
        tokens = sequence.to_ints()
        self.requests.append((tuple(tokens), kwargs))
        self.log.append(("score", len(self.requests)))
        self.scored.set()
        return Value(self._rows(tokens))

    def compute_logprobs(self, sequence: types.ModelInput) -> Value:
        tokens = sequence.to_ints()
        self.requests.append((tuple(tokens), {"compute_logprobs": True}))
        self.log.append(("score", len(self.requests)))
        self.scored.set()
        return Value([None] + [-0.1 * ((t % 7) + 1) for t in tokens[1:]])


class FakeTraining:
    """Records submissions; the loss of a forward_backward is a fixed function of its datums."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.calls: list[tuple[str, list[types.Datum]]] = []

    def forward_backward(self, datums: list[types.Datum], loss_fn: str) -> Value:
        self.calls.append((loss_fn, datums))
        self.log.append(("submit", "forward_backward"))
        loss = sum(float(np.sum(d.loss_fn_inputs["target_tokens"].to_numpy())) for d in datums)
        return Value(types.ForwardBackwardOutput(loss_fn_output_type="x", loss_fn_outputs=[],
                     metrics={"loss:sum": loss}), log=self.log, label="forward_backward")  # fmt: skip

    def forward_backward_custom(self, datums: list[types.Datum], loss: Any) -> Value:
        return self.forward_backward(datums, "custom")

    def optim_step(self, adam: Any) -> Value:
        self.calls.append(("optim_step", []))
        self.log.append(("submit", "optim_step"))
        return Value(None, log=self.log, label="optim_step")


class Tokenizer:
    def __len__(self) -> int:
        return VOCAB


def make_config(tmp_path: Path, **params: Any) -> Any:
    return parse_config(
        {
            "model": {"name": "sdft/tiny-random"},
            "algorithm": {"params": {"group_size": 2, "max_tokens": 8, "topk": 3, **params}},
            "data": {"path": str(tmp_path / "train.jsonl")},
            "output_dir": str(tmp_path / "out"),
        },
        source="test",
    )


def prompts(count: int) -> list[QuestionPrompts]:
    return [
        QuestionPrompts(
            student=types.ModelInput.from_ints([1, 2, 10 + index]),
            teacher=types.ModelInput.from_ints([1, 5, 6, 7, 20 + index]),
        )
        for index in range(count)
    ]


async def run_schedule(schedule: Any, config: Any, *, reverse: bool = False, questions: int = 4,
                       hooks: StepHooks | None = None) -> tuple[Any, FakeTeacher, FakeTraining, list]:  # fmt: skip
    log: list = []
    gates = {index: asyncio.Event() for index in range(questions)}
    student, teacher, training = FakeStudent(log, gates), FakeTeacher(log), FakeTraining(log)
    objective = objective_for(config, training, Tokenizer())
    sampling = SamplingRound(
        student, prompts(questions), params=config.params, seed=3, step=1, stop=None
    )
    run = asyncio.ensure_future(schedule.run(sampling, teacher, objective, 1, hooks or StepHooks()))
    for index in sorted(gates, reverse=reverse):  # responses arrive in this order
        gates[index].set()
        await asyncio.sleep(0)
    return await run, teacher, training, log


def datum_arrays(datum: types.Datum) -> tuple:
    return (
        tuple(datum.model_input.to_ints()),
        *(
            (key, datum.loss_fn_inputs[key].to_numpy().tobytes())
            for key in sorted(datum.loss_fn_inputs)
        ),
    )


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"num_substeps": 3},
        {"loss": "reverse_kl"},
        {"topk": 0},
        {"topk": 0, "num_substeps": 2},
    ],
    ids=["top-k", "top-k 3 substeps", "reverse-kl", "importance-sampling", "is 2 substeps"],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["in order", "reversed arrival"])
def test_streamed_step_sends_the_gathered_requests_and_trains_the_same_datums(
    tmp_path: Path, params: dict[str, Any], reverse: bool
) -> None:
    config = make_config(tmp_path, **params)
    gathered, g_teacher, g_training, _ = asyncio.run(
        run_schedule(GatheredSchedule(), config, reverse=reverse)
    )
    streamed, s_teacher, s_training, _ = asyncio.run(
        run_schedule(StreamedSchedule(), config, reverse=reverse)
    )
    # Same teacher requests (the streamed step sends them in arrival order).
    assert sorted(s_teacher.requests, key=repr) == sorted(g_teacher.requests, key=repr)
    # Same training requests, in the same order, with byte-identical datums.
    assert [name for name, _ in s_training.calls] == [name for name, _ in g_training.calls]
    assert [[datum_arrays(d) for d in datums] for _, datums in s_training.calls] == [
        [datum_arrays(d) for d in datums] for _, datums in g_training.calls
    ]
    assert streamed.result.loss_sum == gathered.result.loss_sum
    assert streamed.result.distilled == gathered.result.distilled
    assert streamed.result.metrics.keys() == gathered.result.metrics.keys()
    for key, value in gathered.result.metrics.items():
        assert streamed.result.metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert streamed.rollouts.completion_lengths == gathered.rollouts.completion_lengths
    # Question 1 samples some empty completions, which are dropped alike.
    assert len(streamed.rollouts) < 8


def test_streamed_step_scores_a_question_before_the_batch_is_sampled(tmp_path: Path) -> None:
    """Question 3's response is held back until the teacher has been asked about question 0:
    the streamed step gets there; the gathered step waits for every sample first."""
    config = make_config(tmp_path)

    async def attempt(schedule: Any) -> bool:
        log: list = []
        gates = {index: asyncio.Event() for index in range(4)}
        for index in range(3):
            gates[index].set()
        student, teacher, training = FakeStudent(log, gates), FakeTeacher(log), FakeTraining(log)
        sampling = SamplingRound(
            student, prompts(4), params=config.params, seed=3, step=1, stop=None
        )
        objective = objective_for(config, training, Tokenizer())
        run = asyncio.ensure_future(schedule.run(sampling, teacher, objective, 1, StepHooks()))
        try:
            await asyncio.wait_for(teacher.scored.wait(), timeout=1.0)
        except TimeoutError:
            run.cancel()
            return False
        gates[3].set()
        await run
        return True

    assert asyncio.run(attempt(StreamedSchedule())) is True
    assert asyncio.run(attempt(GatheredSchedule())) is False


def test_streamed_step_submits_the_refresh_behind_the_last_optim_step(tmp_path: Path) -> None:
    config = make_config(tmp_path, num_substeps=2)
    events: list = []

    def refresh() -> None:
        events.append(("submit", "refresh"))

    async def run() -> list:
        log: list = events
        student, teacher, training = FakeStudent(log), FakeTeacher(log), FakeTraining(log)
        sampling = SamplingRound(
            student, prompts(4), params=config.params, seed=3, step=1, stop=None
        )
        objective = objective_for(config, training, Tokenizer())
        hooks = StepHooks(
            sampled=lambda: events.append(("sampled", "")), training_submitted=refresh
        )
        await StreamedSchedule().run(sampling, teacher, objective, 1, hooks)
        return [e for e in log if e[0] in ("submit", "await", "sampled")]

    order = asyncio.run(run())
    assert order == [
        ("sampled", ""),
        ("submit", "forward_backward"), ("submit", "optim_step"),
        ("submit", "forward_backward"), ("submit", "optim_step"),
        ("submit", "refresh"),
        ("await", "forward_backward"), ("await", "optim_step"),
        ("await", "forward_backward"), ("await", "optim_step"),
    ]  # fmt: skip


def test_gathered_step_never_submits_the_refresh_early(tmp_path: Path) -> None:
    called: list[str] = []
    asyncio.run(
        run_schedule(
            GatheredSchedule(),
            make_config(tmp_path),
            hooks=StepHooks(training_submitted=lambda: called.append("refresh")),
        )
    )
    assert called == []


def test_a_step_without_completion_tokens_fails_by_name(tmp_path: Path) -> None:
    config = make_config(tmp_path)

    class Silent(FakeStudent):
        def sample(self, prompt: Any, num_samples: int, sampling_params: Any) -> Value:
            return Value(Response([Sequence_([]) for _ in range(num_samples)]))

    for schedule in (GatheredSchedule(), StreamedSchedule()):

        async def run(schedule: Any = schedule) -> None:
            log: list = []
            sampling = SamplingRound(
                Silent(log), prompts(2), params=config.params, seed=0, step=7, stop=None
            )
            objective = objective_for(config, FakeTraining(log), Tokenizer())
            await schedule.run(sampling, FakeTeacher(log), objective, 7, StepHooks())

        with pytest.raises(RuntimeError, match=r"^step 7: the student produced no completion"):
            asyncio.run(run())


@pytest.mark.parametrize(("total", "substeps"), [(1, 1), (5, 1), (5, 2), (7, 3), (3, 8), (12, 4)])
def test_streamed_training_cuts_the_batch_like_split_evenly(total: int, substeps: int) -> None:
    log: list = []
    training = FakeTraining(log)
    datums = [
        types.Datum(
            model_input=types.ModelInput.from_ints([i]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=[i], dtype="int64", shape=[1]),
                "weights": types.TensorData(data=[1.0], dtype="float32", shape=[1]),
            },
        )
        for i in range(total)
    ]
    stream = StreamedTraining(
        training, lambda c: training.forward_backward(c, "ce"), None, substeps
    )
    rng = random.Random(total * 31 + substeps)
    cut = sorted(rng.sample(range(1, total), min(total - 1, 2))) if total > 1 else []
    pieces = [datums[a:b] for a, b in zip([0, *cut], [*cut, total], strict=True)]
    stream.add(pieces[0])  # before the size is known: held back
    assert training.calls == []
    stream.expect(total)
    for piece in pieces[1:]:
        stream.add(piece)
    assert stream.complete
    sent = [
        [d.model_input.to_ints()[0] for d in batch]
        for name, batch in training.calls
        if name == "ce"
    ]
    assert sent == [
        [d.model_input.to_ints()[0] for d in chunk] for chunk in split_evenly(datums, substeps)
    ]
    assert [name for name, _ in training.calls] == ["ce", "optim_step"] * len(sent)
    assert asyncio.run(stream.loss_sum()) == float(sum(range(total)))


def test_streamed_training_refuses_what_does_not_add_up() -> None:
    log: list = []
    training = FakeTraining(log)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[1], dtype="int64", shape=[1])},
    )
    stream = StreamedTraining(training, lambda c: training.forward_backward(c, "ce"), None, 1)
    with pytest.raises(RuntimeError, match=r"^0 substep\(s\) submitted, batch size unknown"):
        asyncio.run(stream.loss_sum())
    stream.expect(1)
    with pytest.raises(RuntimeError, match=r"^StreamedTraining.expect was already called$"):
        stream.expect(1)
    stream.add([datum])
    with pytest.raises(ValueError, match=r"^1 datum\(s\) more than the 1 expected$"):
        stream.add([datum])
    with pytest.raises(ValueError, match=r"^a training step needs at least one datum, got 0$"):
        StreamedTraining(training, training.forward_backward, None, 1).expect(0)


def test_merge_metrics_adds_counts_and_reweights_means() -> None:
    from sdft.objectives import COMPLETION_TOKENS, Built

    pieces = [
        Built([], {"n": 2.0, "mean": 0.5, "per_token": 1.0, "k": 20.0}, 4),
        Built([], {"n": 6.0, "mean": 0.25, "per_token": 3.0, "k": 20.0}, 12),
        Built([], {"n": 0.0, "mean": 0.0, "k": 20.0}, 0),
    ]
    merged = merge_metrics(pieces, {"mean": "n", "per_token": COMPLETION_TOKENS}, frozenset({"k"}))
    assert merged == {"n": 8.0, "mean": (2 * 0.5 + 6 * 0.25) / 8, "per_token": 2.5, "k": 20.0}
    assert merge_metrics([pieces[2]], {"mean": "n"}, frozenset()) == {
        "n": 0.0,
        "mean": 0.0,
        "k": 20.0,
    }


def test_schedule_follows_the_streaming_option(tmp_path: Path) -> None:
    assert isinstance(schedule_for(True), StreamedSchedule)
    assert isinstance(schedule_for(False), GatheredSchedule)
    assert make_config(tmp_path).params.streaming is True
    assert make_config(tmp_path).params.overlap_sampling is False
    objective = objective_for(make_config(tmp_path), FakeTraining([]), Tokenizer())
    assert isinstance(objective, TopKCrossEntropy)


# --- the trainer on the tiny local model -------------------------------------------------------


def test_streamed_and_gathered_runs_agree_on_the_local_backend(tmp_path: Path) -> None:
    rows = {}
    for streaming in (True, False):
        folder = tmp_path / str(streaming)
        folder.mkdir()
        recorded_run(
            write_config(
                folder,
                params={"max_steps": 2, "streaming": streaming, "num_substeps": 2},
                benchmarks=[],
            )
        )
        rows[streaming] = [r["metrics"] for r in rows_of(folder / "out") if r["split"] == "train"]
    for streamed, gathered in zip(rows[True], rows[False], strict=True):
        assert streamed["train/num_tokens"] == gathered["train/num_tokens"]
        assert streamed["train/distilled_tokens"] == gathered["train/distilled_tokens"]
        assert streamed["train/off_policy_steps"] == gathered["train/off_policy_steps"] == 0
        assert streamed["train/loss_sum"] == pytest.approx(gathered["train/loss_sum"], rel=1e-4)


def test_overlapped_sampling_is_one_step_off_policy_and_recorded(tmp_path: Path) -> None:
    recorder, _ = recorded_run(
        write_config(tmp_path, params={"max_steps": 3, "overlap_sampling": True}, benchmarks=[])
    )
    rows = [r["metrics"] for r in rows_of(tmp_path / "out") if r["split"] == "train"]
    assert [row["train/off_policy_steps"] for row in rows] == [0, 1, 1]
    # Step 2's samples were requested before step 1's training results were awaited.
    events = recorder.events
    student_samples = [i for i, e in enumerate(events) if e == ("submit", "sample:student")]
    first_training_await = events.index(("await", "forward_backward"))
    assert len(student_samples) == 2 + 2 + 1  # 5 examples in batches of 2: each sampled once
    assert student_samples[2] < first_training_await


def test_overlap_sampling_is_refused_for_sft(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlap_sampling applies to kind: sdft; sft does not"):
        parse_config(
            {
                "algorithm": {"kind": "sft", "params": {"overlap_sampling": True}},
                "data": {"path": str(tmp_path / "train.jsonl")},
                "output_dir": str(tmp_path / "out"),
            },
            source="test",
        )
