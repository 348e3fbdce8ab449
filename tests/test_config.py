"""The YAML config: defaults, path resolution, and clear errors naming file, line and key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sdft.config import (
    ConfigError,
    capability_problems,
    load_config,
    parse_config,
    training_differences,
    write_resolved_config,
)
from sdft.data import DEFAULT_DEMO_TEMPLATE

MINIMAL = """\
model:
  name: sdft/tiny-random
data:
  path: data/train.jsonl
output_dir: outputs/run
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    params = config.params
    assert config.model.name == "sdft/tiny-random"
    assert config.backend.kind == "local"
    assert config.backend.device == "auto"
    assert config.backend.dtype == "float32"
    assert config.algorithm.kind == "sdft"
    assert (params.learning_rate, params.max_steps, params.batch_size, params.group_size) == (
        2e-5,
        100,
        4,
        1,
    )
    assert (params.topk, params.skip_first_n, params.lora_rank, params.loss) == (
        20,
        3,
        32,
        "cross_entropy",
    )
    assert params.demo_template == DEFAULT_DEMO_TEMPLATE
    assert params.user_template == "{question}"
    assert params.teacher.mode == "static"
    assert (params.beta1, params.beta2, params.eps) == (0.9, 0.95, 1e-8)
    assert config.data.source_kind == "jsonl"
    assert config.metadata.benchmark == []
    assert config.seed == 0


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    text = MINIMAL + "metadata:\n  benchmark:\n    - {name: val, path: data/val}\n"
    config = load_config(write(tmp_path, text))
    assert config.data.path == (tmp_path / "data/train.jsonl").resolve()
    assert config.output_dir == (tmp_path / "outputs/run").resolve()
    assert config.metadata.benchmark[0].path == (tmp_path / "data/val").resolve()
    assert config.checkpoint_root == (tmp_path / "outputs/run/checkpoints").resolve()


def test_model_name_that_is_a_relative_path_resolves_too(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("sdft/tiny-random", "./models/mine")))
    assert config.model.name == str((tmp_path / "models/mine").resolve())


def test_unknown_key_names_file_line_path_and_allowed_keys(tmp_path: Path) -> None:
    text = MINIMAL + "algorithm:\n  params:\n    lr: 0.1\n"
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.yaml'}:8: algorithm.params.lr: unknown key")
    assert "learning_rate" in message and "allowed:" in message


def test_top_level_unknown_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "epochs: 3\n")
    assert message == f"{tmp_path / 'config.yaml'}:6: epochs: unknown key (allowed: " + (
        "algorithm, backend, data, metadata, model, output_dir, seed)"
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "algorithm:\n  params:\n    learning_rate: -1\n",
            ":8: algorithm.params.learning_rate: must be greater than 0",
        ),
        (
            "algorithm:\n  params:\n    max_steps: 0\n",
            ":8: algorithm.params.max_steps: must be greater than or equal to 1",
        ),
        (
            "algorithm:\n  params:\n    batch_size: four\n",
            ":8: algorithm.params.batch_size: must be an integer, got string 'four'",
        ),
        (
            "algorithm:\n  params:\n    loss: kl\n",
            ":8: algorithm.params.loss: must be one of 'cross_entropy', 'reverse_kl' or "
            "'full_kl', not 'kl'",
        ),
        (
            "algorithm:\n  kind: dpo\n",
            ":7: algorithm.kind: must be one of 'sdft' or 'sft', not 'dpo'",
        ),
        (
            "backend:\n  kind: local\n  device: gpu\n",
            ":8: backend.device: must be auto, cpu, mps, cuda or cuda:N, not 'gpu'",
        ),
        (
            "backend:\n  kind: local\n  base_url: http://localhost:1\n",
            ":6: backend: base_url applies to kind: tinker only",
        ),
        (
            "backend:\n  kind: tinker\n  base_url: localhost:1\n",
            ":8: backend.base_url: must be an http(s):// URL, not 'localhost:1'",
        ),
    ],
)
def test_bad_values_name_the_key_path_and_line(tmp_path: Path, snippet: str, expected: str) -> None:
    assert error_of(tmp_path, MINIMAL + snippet) == f"{tmp_path / 'config.yaml'}{expected}"


def test_missing_required_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, "model:\n  name: sdft/tiny-random\n")
    assert message.splitlines() == [
        f"{tmp_path / 'config.yaml'}:1: data: required key is missing",
        f"{tmp_path / 'config.yaml'}:1: output_dir: required key is missing",
    ]


def test_templates_are_checked(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        MINIMAL + "algorithm:\n  params:\n    user_template: 'Q: {question} A: {answer}'\n",
    )
    assert message.endswith(
        "algorithm.params.user_template: uses unknown placeholder(s) {answer}; allowed: {question}"
    )
    message = error_of(
        tmp_path, MINIMAL + "algorithm:\n  params:\n    demo_template: 'Answer {question}'\n"
    )
    assert message.endswith("algorithm.params.demo_template: must contain {golden_answer}")
    message = error_of(
        tmp_path, MINIMAL + "algorithm:\n  params:\n    user_template: '{question'\n"
    )
    assert "algorithm.params.user_template: is not a valid format string" in message


def test_teacher_mode_options(tmp_path: Path) -> None:
    base = MINIMAL + "algorithm:\n  params:\n    teacher: "
    assert error_of(tmp_path, base + "{mode: sync}\n").endswith(
        "algorithm.params.teacher: mode: sync needs sync_every (steps between hard syncs)"
    )
    assert error_of(tmp_path, base + "{mode: static, sync_every: 3}\n").endswith(
        "algorithm.params.teacher: sync_every applies to mode: sync, not mode: static"
    )
    assert error_of(tmp_path, base + "{mode: sync, sync_every: 2, ema_alpha: 0.1}\n").endswith(
        "algorithm.params.teacher: ema_alpha applies to mode: ema, not mode: sync"
    )
    assert error_of(tmp_path, base + "{mode: ema, ema_alpha: 1.5}\n").endswith(
        "algorithm.params.teacher.ema_alpha: must be less than or equal to 1"
    )
    config = load_config(write(tmp_path, base + "{mode: sync, sync_every: 4}\n"))
    assert config.params.teacher.sync_every == 4


def test_loss_and_algorithm_combinations(tmp_path: Path) -> None:
    assert error_of(
        tmp_path, MINIMAL + "algorithm:\n  params:\n    loss: reverse_kl\n    topk: 0\n"
    ).endswith("algorithm: params.loss: reverse_kl needs params.topk > 0")
    assert error_of(
        tmp_path, MINIMAL + "algorithm:\n  kind: sft\n  params:\n    loss: full_kl\n"
    ).endswith("algorithm: params.loss applies to kind: sdft; sft trains with cross_entropy")


def test_tinker_backend_rejects_local_only_features_with_key_lines(tmp_path: Path) -> None:
    text = MINIMAL + (
        "backend:\n  kind: tinker\n"
        "algorithm:\n  params:\n    lora_rank: null\n    loss: full_kl\n    teacher: {mode: ema}\n"
    )
    path = tmp_path / "config.yaml"
    assert error_of(tmp_path, text).splitlines() == [
        f"{path}:10: algorithm.params.lora_rank: full fine-tuning (null or 0) needs backend.kind: "
        "local; Tinker trains LoRA adapters, set a rank such as 32",
        f"{path}:11: algorithm.params.loss: full_kl needs backend.kind: local (Tinker returns "
        "only top-K teacher log-probs)",
        f"{path}:12: algorithm.params.teacher.mode: ema needs backend.kind: local; use static or "
        "sync with Tinker",
    ]
    ok = load_config(write(tmp_path, MINIMAL + "backend:\n  kind: tinker\n"))
    assert capability_problems(ok) == []
    assert ok.params.lora_rank == 32


@pytest.mark.parametrize("rank", ["null", "0"])
def test_full_finetuning_is_lora_rank_null_or_zero(tmp_path: Path, rank: str) -> None:
    config = load_config(
        write(tmp_path, MINIMAL + f"algorithm:\n  params:\n    lora_rank: {rank}\n")
    )
    assert config.params.full_finetune


def test_benchmark_entries(tmp_path: Path) -> None:
    text = MINIMAL + (
        "metadata:\n  benchmark:\n"
        "    - {name: learned, path: b/learned, run_every: 4, metrics: [pass@1, pass@4]}\n"
        "    - {name: retained, path: b/retained, split: test}\n"
    )
    config = load_config(write(tmp_path, text))
    learned, retained = config.metadata.benchmark
    assert learned.ks == [1, 4] and learned.num_samples == 4 and learned.split == "val"
    assert retained.run_every is None and retained.metrics == ["pass@1"]
    assert retained.split == "test"

    bench = MINIMAL + "metadata:\n  benchmark:\n"
    assert error_of(
        tmp_path, bench + "    - {name: a, path: x}\n    - {name: a, path: y}\n"
    ).endswith("metadata.benchmark: benchmark name 'a' is used twice")
    assert error_of(tmp_path, bench + "    - {name: 'a b', path: x}\n").endswith(
        "metadata.benchmark[0].name: 'a b' must be letters, digits, '_', '.' or '-' "
        "(it names output files)"
    )
    assert error_of(tmp_path, bench + "    - {name: a, path: x, metrics: [accuracy]}\n").endswith(
        "metadata.benchmark[0].metrics: unknown metric 'accuracy'; use pass@K (pass@1, pass@4, ...)"
    )
    assert error_of(tmp_path, bench + "    - {name: a, path: x, run_every: 0}\n").endswith(
        "metadata.benchmark[0].run_every: must be greater than or equal to 1"
    )
    assert error_of(tmp_path, bench + "    - {name: a}\n").endswith(
        "metadata.benchmark[0].path: required key is missing"
    )


def test_drift_benchmark_entries(tmp_path: Path) -> None:
    bench = MINIMAL + "metadata:\n  benchmark:\n"
    config = load_config(
        write(
            tmp_path,
            bench
            + "    - {name: drift, kind: drift, path: p.jsonl, run_every: 2}\n"
            + "    - {name: exact, kind: drift, path: p.jsonl, metrics: [kl, kl_full]}\n"
            + "    - {name: tasks, path: b}\n",
        )
    )
    drift, exact, tasks = config.metadata.benchmark
    assert (drift.kind, drift.metrics, drift.ks, drift.num_samples) == ("drift", ["kl"], [1], 1)
    assert exact.metrics == ["kl", "kl_full"]
    assert (tasks.kind, tasks.metrics) == ("tasks", ["pass@1"])
    assert config.resolved_dict()["metadata"]["benchmark"][0]["kind"] == "drift"

    line = "    - {name: d, kind: drift, path: p.jsonl, "
    assert error_of(tmp_path, bench + line + "metrics: [kl, pass@1]}\n").endswith(
        ":8: metadata.benchmark[0].metrics: kind: drift has the metrics kl, kl_full, not pass@1"
    )
    assert error_of(tmp_path, bench + line + "user_template: 'Q: {question}'}\n").endswith(
        "metadata.benchmark[0]: user_template applies to kind: tasks; a drift prompt is sent as "
        "written"
    )
    assert error_of(tmp_path, bench + line + "answer_after: '</s>'}\n").endswith(
        "metadata.benchmark[0]: answer_after applies to kind: tasks; a drift prompt is sent as "
        "written"
    )
    assert error_of(tmp_path, bench + line + "temperature: 0.5}\n").endswith(
        "metadata.benchmark[0]: kind: drift samples at temperature 1 (the KL is an expectation "
        "under the model's own distribution)"
    )
    assert error_of(tmp_path, bench + "    - {name: d, kind: kl, path: p}\n").endswith(
        "metadata.benchmark[0].kind: must be one of 'tasks' or 'drift', not 'kl'"
    )
    # answer_after: null and temperature: 1 are what a drift benchmark does anyway
    load_config(write(tmp_path, bench + line + "answer_after: null, temperature: 1}\n"))

    tinker = bench.replace(
        "data:\n", "backend:\n  kind: tinker\n  base_url: http://127.0.0.1:1\ndata:\n", 1
    )
    message = error_of(tmp_path, tinker + line + "metrics: [kl, kl_full]}\n")
    assert message == (
        f"{tmp_path / 'config.yaml'}:11: metadata.benchmark[0].metrics: kl_full needs the full "
        "next-token distributions of the local backend; on backend.kind: tinker use kl"
    )
    load_config(write(tmp_path, tinker + line + "metrics: [kl]}\n"))


def test_data_section_checks(tmp_path: Path) -> None:
    assert error_of(
        tmp_path,
        MINIMAL.replace("  path: data/train.jsonl\n", "  path: d\n  fields: {prompt: q}\n"),
    ).endswith(
        "data.fields: unknown field(s) prompt; known: question, golden_answer, id, system_prompt "
        "(each maps to the column name used in your data)"
    )
    assert error_of(
        tmp_path, MINIMAL.replace("  path: data/train.jsonl\n", "  path: d\n  split: train\n")
    ).endswith("data: split applies to source_kind: hf only")
    config = load_config(
        write(
            tmp_path,
            MINIMAL.replace(
                "  path: data/train.jsonl\n",
                "  source_kind: hf\n  path: d\n  split: train\n  fields: {question: q}\n",
            ),
        )
    )
    assert (config.data.source_kind, config.data.split, config.data.fields) == (
        "hf",
        "train",
        {"question": "q"},
    )


def test_yaml_syntax_errors_and_non_mappings(tmp_path: Path) -> None:
    message = error_of(tmp_path, "model:\n  name: [unclosed\n")
    assert re.match(rf"{re.escape(str(tmp_path / 'config.yaml'))}:3: not valid YAML \(", message)
    assert error_of(tmp_path, "") == (
        f"{tmp_path / 'config.yaml'}: the config must be a mapping of keys, got empty"
    )
    assert error_of(tmp_path, "- a\n- b\n") == (
        f"{tmp_path / 'config.yaml'}: the config must be a mapping of keys, got list"
    )
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    text = MINIMAL + (
        "algorithm:\n  kind: sdft\n  params: {lora_rank: null, topk: 5, teacher: {mode: ema}}\n"
        "metadata:\n  benchmark:\n    - {name: val, path: b/val, run_every: 2}\n"
    )
    config = load_config(write(tmp_path, text))
    target = write_resolved_config(config)
    assert target == config.output_dir / "config.resolved.yaml"
    raw = yaml.safe_load(target.read_text(encoding="utf-8"))
    assert raw["backend"]["checkpoint_root"] == str(config.checkpoint_root)
    assert raw["algorithm"]["params"]["demo_template"] == DEFAULT_DEMO_TEMPLATE
    again = parse_config(raw, source=str(target), base_dir=Path("/nonexistent"))
    assert again.resolved_dict() == config.resolved_dict()


def test_training_differences_ignore_what_resume_may_change(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    before = config.resolved_dict()
    config.algorithm.params.max_steps = 500
    config.algorithm.params.save_every = 3
    assert training_differences(before, config.resolved_dict()) == []
    config.algorithm.params.learning_rate = 1e-3
    config.seed = 7
    assert training_differences(before, config.resolved_dict()) == [
        "algorithm.params.learning_rate",
        "seed",
    ]


# --- hostile or mistaken YAML ------------------------------------------------------------------


def alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_rejected_with_its_line(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb.encode()) < 600
    assert error_of(tmp_path, MINIMAL + bomb) == (
        f"{tmp_path / 'config.yaml'}:11: the YAML expands to more than 100000 values once its "
        "aliases are followed (an alias bomb?)"
    )


def test_yaml_recursive_alias_is_rejected(tmp_path: Path) -> None:
    assert error_of(tmp_path, MINIMAL + "x: &x [1, *x]\n") == (
        f"{tmp_path / 'config.yaml'}:6: a YAML alias refers to itself"
    )


def test_yaml_aliases_within_reason_still_work(tmp_path: Path) -> None:
    text = MINIMAL + (
        "metadata:\n  benchmark:\n    - &bench {name: a, path: b/a, run_every: 4}\n"
        "    - {<<: *bench, name: b}\n"
    )
    config = load_config(write(tmp_path, text))
    assert [(b.name, b.run_every) for b in config.metadata.benchmark] == [("a", 4), ("b", 4)]


def test_duplicate_keys_are_rejected_with_both_lines(tmp_path: Path) -> None:
    text = (
        MINIMAL + "algorithm:\n  params:\n    max_steps: 5\n    batch_size: 2\n    max_steps: 50\n"
    )
    assert error_of(tmp_path, text) == (
        f"{tmp_path / 'config.yaml'}:10: duplicate key 'max_steps' (first defined at line 8)"
    )
    assert error_of(tmp_path, MINIMAL + "output_dir: other\n") == (
        f"{tmp_path / 'config.yaml'}:6: duplicate key 'output_dir' (first defined at line 5)"
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "algorithm:\n  params:\n    max_steps: true\n",
            ":8: algorithm.params.max_steps: must be an integer, got boolean True",
        ),
        (
            'algorithm:\n  params:\n    max_steps: "3"\n',
            ":8: algorithm.params.max_steps: must be an integer, got string '3'",
        ),
        (
            "algorithm:\n  params:\n    max_steps: 100000000000000000000000\n",
            ":8: algorithm.params.max_steps: must be less than or equal to 10000000",
        ),
        (
            "algorithm:\n  params:\n    generate_from_teacher: 1\n",
            ":8: algorithm.params.generate_from_teacher: must be true or false, got integer 1",
        ),
        (
            "algorithm:\n  params:\n    learning_rate: .inf\n",
            ":8: algorithm.params.learning_rate: must be a finite number",
        ),
        (
            "algorithm:\n  params:\n    lora_rank: 1000000\n",
            ":8: algorithm.params.lora_rank: must be less than or equal to 4096",
        ),
        (
            "seed: 100000000000000000000000000000\n",
            ":6: seed: must be less than or equal to 9223372036854775807",
        ),
        ("seed: -1\n", ":6: seed: must be greater than or equal to 0"),
        (
            "metadata:\n  benchmark:\n    - {name: v, path: v, metrics: [pass@100000]}\n",
            ":8: metadata.benchmark[0].metrics: pass@100000 needs more than 1024 samples per "
            "task; use a smaller K",
        ),
    ],
)
def test_integers_and_booleans_are_strict_and_bounded(
    tmp_path: Path, snippet: str, expected: str
) -> None:
    assert error_of(tmp_path, MINIMAL + snippet) == f"{tmp_path / 'config.yaml'}{expected}"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    text = MINIMAL + "algorithm:\n  params:\n    learning_rate: 1e-3\n    eps: 5E-9\n"
    params = load_config(write(tmp_path, text)).params
    assert (params.learning_rate, params.eps) == (1e-3, 5e-9)


def test_skip_first_n_must_leave_tokens_to_train_on(tmp_path: Path) -> None:
    text = MINIMAL + "algorithm:\n  params:\n    max_tokens: 8\n    skip_first_n: 8\n"
    assert error_of(tmp_path, text) == (
        f"{tmp_path / 'config.yaml'}:9: algorithm.params.skip_first_n: skip_first_n (8) must be "
        "less than max_tokens (8): the first skip_first_n completion tokens get no loss, so "
        "every step would train on 0 tokens"
    )
    sft = MINIMAL + "algorithm:\n  kind: sft\n  params:\n    max_tokens: 2\n"
    assert load_config(write(tmp_path, sft)).params.max_tokens == 2


def test_output_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "outputs").write_text("not a directory")
    assert error_of(tmp_path, MINIMAL) == (
        f"{tmp_path / 'config.yaml'}:5: output_dir: {tmp_path / 'outputs'} is a file, so "
        f"{tmp_path / 'outputs/run'} cannot be created"
    )
    (tmp_path / "outputs").unlink()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs/run").write_text("")
    assert error_of(tmp_path, MINIMAL) == (
        f"{tmp_path / 'config.yaml'}:5: output_dir: {tmp_path / 'outputs/run'} exists and is "
        "not a directory"
    )


def test_non_utf8_config_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:6: not valid UTF-8 (byte 0xe9); save the config as UTF-8"


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    assert message == f"{tmp_path / 'config.yaml'}: the YAML is nested too deeply to read"


def test_a_copied_project_resumes_with_the_same_training_config(tmp_path: Path) -> None:
    import shutil

    original = tmp_path / "a"
    original.mkdir()
    config = load_config(write(original, MINIMAL))
    write_resolved_config(config)
    previous = yaml.safe_load((config.output_dir / "config.resolved.yaml").read_text())
    shutil.copytree(original, tmp_path / "b", symlinks=True)
    moved = load_config(tmp_path / "b" / "config.yaml")
    assert moved.data.path != config.data.path
    assert training_differences(previous, moved.resolved_dict()) == []
    # A different data file is still a different training config.
    moved.data.path = tmp_path / "b" / "data" / "other.jsonl"
    assert training_differences(previous, moved.resolved_dict()) == ["data.path"]
