"""The continual-learning experiment file: its model, its loader, and the run configs it expands to.

An experiment names a base run config (``sdft train``'s YAML), the ``methods`` to compare (each a
name plus overrides of that config), ``learning_rates``, ``seeds``, the ``stages`` trained one after
the other (each with its own training data, ``max_steps`` and benchmarks) and the ``benchmarks``
scored after every stage. Every (method, learning rate, seed) is one *chain*: stage 1 trains from
the base model, stage k+1 from stage k's final checkpoint.

Errors are :class:`ExperimentError` (a ``ValueError``) whose lines read ``file:line: key: message``
like the run config's; a problem in a run config built from the experiment is reported at the
line that set the offending value: the method's or stage's override in the experiment file, or
the base config.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdft.config import (
    DRIFT_METRICS,
    Config,
    ConfigError,
    _allowed_keys,
    _friendly,
    _key_path,
    _line_for,
    _yaml_lines,
    capability_problems,
    load_yaml,
    read_config_text,
    resolve_paths,
)
from sdft.evals import parse_metric

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExperimentError(ConfigError):
    """An invalid experiment; every line names the file, line and key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{value!r} must be letters, digits, '_', '.' or '-' (it names folders)")
    return value


class BenchmarkSpec(_Strict):
    """One benchmark: ``kind: tasks`` (pass@k of verified answers) or ``kind: drift`` (mean
    per-token KL(model || base) on the model's own samples of held-out prompts).

    Tasks come from ``tasks.jsonl`` (``source_kind: tasks``) or from training-style data
    (``jsonl``/``hf``/``arrow`` with ``fields``) whose golden answer is the ``verifier``'s
    ``expected`` value, e.g. the paper's tool-use and science evaluation sets."""

    name: str
    kind: Literal["tasks", "drift"] = "tasks"
    path: Path
    source_kind: Literal["tasks", "jsonl", "hf", "arrow"] = "tasks"
    fields: dict[str, str] | None = None
    split: str | None = None
    verifier: str | None = None
    metrics: list[str] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    limit: Annotated[int, Field(ge=1)] | None = None
    num_samples: Annotated[int, Field(ge=1)] = 1
    system_prompt: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkSpec:
        if self.kind == "drift":
            for key in ("fields", "split", "verifier"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to kind: tasks, not kind: drift")
            if self.source_kind != "tasks":
                raise ValueError("source_kind applies to kind: tasks; a drift file lists prompts")
            if self.metrics is not None:
                unknown = [m for m in self.metrics if m not in DRIFT_METRICS]
                if unknown or not self.metrics:
                    raise ValueError(
                        f"drift metrics are {', '.join(DRIFT_METRICS)}, not {', '.join(unknown)}"
                    )
            if "temperature" in self.model_fields_set and self.temperature != 1.0:
                raise ValueError(
                    "kind: drift samples at temperature 1 (the KL is an expectation under the "
                    "model's own distribution)"
                )
            return self
        metrics = self.metrics or ["pass@1"]
        for metric in metrics:
            k = parse_metric(metric)
            if k > self.num_samples:
                raise ValueError(f"{metric} needs num_samples >= {k}")
        if self.source_kind == "tasks":
            for key in ("fields", "split", "verifier"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key} applies to source_kind jsonl/hf/arrow; tasks.jsonl names its "
                        "own verifiers"
                    )
        else:
            if self.verifier is None:
                raise ValueError(
                    f"source_kind: {self.source_kind} needs verifier (the fn_name that checks a "
                    "response against each row's golden answer, e.g. tooluse or mcq)"
                )
            from sdft.evals import verifier_names

            if self.verifier not in verifier_names():
                raise ValueError(
                    f"unknown verifier {self.verifier!r}; known: {', '.join(verifier_names())}"
                )
            if self.split is not None and self.source_kind != "hf":
                raise ValueError("split applies to source_kind: hf only")
        return self

    @property
    def metric_names(self) -> list[str]:
        if self.kind == "drift":
            return list(self.metrics or ["kl"])
        return list(self.metrics or ["pass@1"])

    @property
    def main_metric(self) -> str:
        """The metric shown in the tables and plots (the first listed)."""
        return self.metric_names[0]


class MethodSpec(_Strict):
    name: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)


class StageSpec(_Strict):
    name: str
    data: dict[str, Any]
    max_steps: Annotated[int, Field(ge=1)]
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict)
    teacher_check_verifier: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)


def _unique(values: list[Any], what: str) -> list[Any]:
    seen: set[Any] = set()
    for value in values:
        key = getattr(value, "name", value)
        if key in seen:
            raise ValueError(f"{what} {key!r} is listed twice")
        seen.add(key)
    return values


class ExperimentSpec(_Strict):
    base_config: Path
    output_dir: Path | None = None
    methods: Annotated[list[MethodSpec], Field(min_length=1)]
    learning_rates: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1)]
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0])
    stages: Annotated[list[StageSpec], Field(min_length=1)]
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    data_root: Path | None = None
    teacher: Literal["stage_start", "base"] = "stage_start"
    teacher_check_examples: Annotated[int, Field(ge=1)] = 8

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        return _unique(value, "method")

    @field_validator("learning_rates")
    @classmethod
    def _lrs(cls, value: list[float]) -> list[float]:
        return _unique(value, "learning rate")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _unique(value, "seed")

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[StageSpec]) -> list[StageSpec]:
        return _unique(value, "stage")

    @model_validator(mode="after")
    def _benchmark_names(self) -> ExperimentSpec:
        _unique([b.name for b in self.all_benchmarks()], "benchmark name")
        return self

    def all_benchmarks(self) -> list[BenchmarkSpec]:
        """Every stage's own benchmarks (in stage order), then the experiment-wide ones."""
        return [b for stage in self.stages for b in stage.benchmarks] + list(self.benchmarks)


# --- chains and runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """One (method, learning rate, seed): its stages train one after the other."""

    method: str
    learning_rate: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.method}/lr{self.learning_rate:g}/seed{self.seed}"

    @property
    def relative_dir(self) -> Path:
        return Path("runs") / self.method / f"lr{self.learning_rate:g}" / f"seed{self.seed}"


@dataclass(frozen=True)
class StageRun:
    """One training run: a chain's stage ``index`` (1-based), with its complete run config."""

    chain: Chain
    index: int
    stage: StageSpec
    config: Config

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    @property
    def label(self) -> str:
        return f"{self.chain.label}/stage{self.index}-{self.stage.name}"


@dataclass
class Experiment:
    """A loaded, fully validated experiment: the spec plus every run config it expands to."""

    spec: ExperimentSpec
    path: Path
    output_dir: Path
    base_config: Config
    chains: list[Chain]
    runs: dict[tuple[Chain, int], StageRun]

    def stage_runs(self, chain: Chain) -> list[StageRun]:
        return [self.runs[(chain, index)] for index in range(1, len(self.spec.stages) + 1)]

    @property
    def benchmarks(self) -> list[BenchmarkSpec]:
        return self.spec.all_benchmarks()

    def stage_of(self, benchmark: str) -> int | None:
        """The 1-based stage whose own benchmark this is (``None``: scored for every stage)."""
        for index, stage in enumerate(self.spec.stages, start=1):
            if any(b.name == benchmark for b in stage.benchmarks):
                return index
        return None


# --- overrides --------------------------------------------------------------------------------


def expand_overrides(
    overrides: dict[str, Any], where: tuple[Any, ...]
) -> tuple[dict[str, Any], dict[tuple[str, ...], tuple[Any, ...]]]:
    """Nested overrides from a mapping whose keys may be dotted (``algorithm.params.topk: 0``),
    and, for every path it sets, the key path in the experiment file that set it."""
    nested: dict[str, Any] = {}
    origins: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def walk(value: Any, path: tuple[str, ...], source: tuple[Any, ...]) -> None:
        for depth in range(1, len(path)):
            origins.setdefault(path[:depth], source)
        origins[path] = source
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, *str(key).split(".")), (*source, key))
            return
        node = nested
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = copy.deepcopy(value)

    for key, value in overrides.items():
        walk(value, tuple(str(key).split(".")), (*where, key))
    return nested, origins


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in (mappings merge key by key; other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- loading ----------------------------------------------------------------------------------


def _read_yaml(path: Path, what: str) -> tuple[Any, str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    text = read_config_text(path)
    try:
        return load_yaml(text, str(path)), text
    except ConfigError as exc:
        raise ExperimentError(str(exc)) from None


def _located(source: str, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> str:
    line = _line_for(loc, lines)
    return f"{source}:{line}" if line is not None else source


def _spec_errors(exc: ValidationError, source: str, lines: dict[tuple[Any, ...], int]) -> str:
    messages: list[tuple[int, str]] = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        line = _line_for(loc, lines) or 0
        where = _located(source, lines, loc)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(ExperimentSpec, loc)
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            messages.append((line, f"{where}: {_key_path(loc)}: unknown key{hint}"))
        else:
            messages.append((line, f"{where}: {_key_path(loc)}: {_friendly(dict(error))}"))
    messages.sort(key=lambda item: item[0])
    return "\n".join(dict.fromkeys(message for _, message in messages))


def _resolve(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


class _Origins:
    """Where each key of a run config was set: experiment file or base config."""

    def __init__(
        self,
        experiment: tuple[str, dict[tuple[Any, ...], int]],
        base: tuple[str, dict[tuple[Any, ...], int]],
    ) -> None:
        self.experiment = experiment
        self.base = base
        self.fixed: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self.layers: list[dict[tuple[str, ...], tuple[Any, ...]]] = []

    def where(self, loc: tuple[Any, ...]) -> tuple[str, str]:
        """``(file:line, key path in that file)`` for a run-config error at ``loc``."""
        key = tuple(str(part) for part in loc)
        for depth in range(len(key), 0, -1):
            for mapping in (self.fixed, *reversed(self.layers)):
                origin = mapping.get(key[:depth])
                if origin is not None:
                    rest = tuple(loc[depth:])
                    full = (*origin, *rest)
                    source, lines = self.experiment
                    line = _line_for(full, lines)
                    shown = f"{source}:{line}" if line is not None else source
                    return shown, _key_path(full)
        source, lines = self.base
        return _located(source, lines, loc), _key_path(loc)


def _run_config_errors(
    raw: dict[str, Any], origins: _Origins, base_dir: Path
) -> tuple[Config | None, list[str]]:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            where, key = origins.where(loc)
            if error["type"] == "extra_forbidden":
                allowed = _allowed_keys(Config, loc)
                hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
                messages.append(f"{where}: {key}: unknown key{hint}")
            else:
                messages.append(f"{where}: {key}: {_friendly(dict(error))}")
        return None, messages
    problems = capability_problems(config)
    if problems:
        messages = []
        for loc, message in problems:
            where, key = origins.where(loc)
            messages.append(f"{where}: {key}: {message}")
        return None, messages
    return resolve_paths(config, base_dir), []


def parse_experiment(
    raw: Any, *, path: Path, text: str = "", data_root: Path | None = None
) -> Experiment:
    """Validate an experiment mapping read from ``path`` and expand it into its run configs.

    Relative stage data and benchmark paths resolve against ``data_root`` (this argument, else the
    file's ``data_root`` key, else the experiment file's folder); other relative paths against the
    experiment file's folder."""
    source = str(path)
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else type(raw).__name__
        raise ExperimentError(f"{source}: the experiment must be a mapping of keys, got {kind}")
    lines = _yaml_lines(text)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise ExperimentError(_spec_errors(exc, source, lines)) from None

    here = path.parent.resolve()
    if data_root is not None:
        root = data_root.expanduser().resolve()
    elif spec.data_root is not None:
        root = _resolve(here, spec.data_root)
    else:
        root = here
    base_path = _resolve(here, spec.base_config)
    if not base_path.is_file():
        raise ExperimentError(
            f"{_located(source, lines, ('base_config',))}: base_config: file not found: {base_path}"
        )
    base_raw, base_text = _read_yaml(base_path, "base config")
    if not isinstance(base_raw, dict):
        raise ExperimentError(f"{base_path}: the base config must be a mapping of keys")
    base_lines = _yaml_lines(base_text)
    output_dir = (
        _resolve(here, spec.output_dir)
        if spec.output_dir is not None
        else (here / "outputs" / path.stem).resolve()
    )
    # The base config's own benchmarks, output_dir and data are replaced by the experiment's; it
    # still has to be complete on its own (data is required), so a placeholder fills it.
    base_only = dict(base_raw)
    base_only.setdefault("data", {"path": "unused"})
    base_only["output_dir"] = str(output_dir / "base")
    base_only.pop("metadata", None)
    origins = _Origins((source, lines), (str(base_path), base_lines))
    base_config, errors = _run_config_errors(base_only, origins, base_path.parent)
    if errors:
        raise ExperimentError("\n".join(dict.fromkeys(errors)))
    assert base_config is not None

    stage_layers = []
    for index, stage in enumerate(spec.stages):
        nested, stage_origins = expand_overrides(stage.overrides, ("stages", index, "overrides"))
        data = dict(stage.data)
        if isinstance(data.get("path"), str):
            data["path"] = str(_resolve(root, Path(data["path"])))
        stage_layers.append((nested, stage_origins, data))
    method_layers = []
    for index, method in enumerate(spec.methods):
        method_layers.append(expand_overrides(method.overrides, ("methods", index, "overrides")))

    # Seed-major: a partly finished experiment has every method × lr at the first seeds.
    chains = [
        Chain(method.name, lr, seed)
        for seed in spec.seeds
        for method in spec.methods
        for lr in spec.learning_rates
    ]
    runs: dict[tuple[Chain, int], StageRun] = {}
    errors = []
    for m_index, method in enumerate(spec.methods):
        for s_index, stage in enumerate(spec.stages):
            stage_nested, stage_origins, data = stage_layers[s_index]
            method_nested, method_origins = method_layers[m_index]
            for l_index, lr in enumerate(spec.learning_rates):
                for seed_index, seed in enumerate(spec.seeds):
                    chain = Chain(method.name, lr, seed)
                    run_dir = output_dir / chain.relative_dir / f"stage{s_index + 1}-{stage.name}"
                    merged = deep_merge(deep_merge(base_raw, stage_nested), method_nested)
                    merged["data"] = data
                    merged["output_dir"] = str(run_dir)
                    merged["seed"] = seed
                    merged["metadata"] = {"benchmark": []}
                    algorithm = merged.setdefault("algorithm", {})
                    if not isinstance(algorithm, dict):
                        algorithm = merged["algorithm"] = {}
                    params = algorithm.setdefault("params", {})
                    if not isinstance(params, dict):
                        params = algorithm["params"] = {}
                    params["learning_rate"] = lr
                    params["max_steps"] = stage.max_steps
                    origins.layers = [stage_origins, method_origins]
                    origins.fixed = {
                        ("data",): ("stages", s_index, "data"),
                        ("output_dir",): ("output_dir",),
                        ("seed",): ("seeds", seed_index),
                        ("algorithm", "params", "learning_rate"): ("learning_rates", l_index),
                        ("algorithm", "params", "max_steps"): ("stages", s_index, "max_steps"),
                    }
                    config, run_errors = _run_config_errors(merged, origins, base_path.parent)
                    errors.extend(run_errors)
                    if config is not None:
                        # data and benchmark paths are already absolute (experiment-relative).
                        runs[(chain, s_index + 1)] = StageRun(chain, s_index + 1, stage, config)
    for chain in chains:
        ranks = {
            run.config.params.lora_rank or 0 for (other, _), run in runs.items() if other == chain
        }
        if len(ranks) > 1:
            errors.append(
                f"{source}: stages: chain {chain.label} changes lora_rank between stages "
                f"({', '.join(str(r) for r in sorted(ranks))}); a stage continues the previous "
                "stage's weights, so every stage must use the same rank"
            )
            break
    if errors:
        raise ExperimentError("\n".join(dict.fromkeys(errors)))

    for benchmark in spec.all_benchmarks():
        benchmark.path = _resolve(root, benchmark.path)
    return Experiment(
        spec=spec,
        path=path.resolve(),
        output_dir=output_dir,
        base_config=base_config,
        chains=chains,
        runs=runs,
    )


def load_experiment(path: str | Path, *, data_root: Path | None = None) -> Experiment:
    """Read, validate and expand the experiment file at ``path`` (see :func:`parse_experiment`)."""
    path = Path(path)
    raw, text = _read_yaml(path, "experiment file")
    return parse_experiment(raw, path=path, text=text, data_root=data_root)


def is_experiment_file(path: str | Path) -> bool:
    """True when the YAML at ``path`` is a mapping with ``stages`` (an experiment, not a run)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "stages" in raw


__all__ = [
    "DRIFT_METRICS",
    "BenchmarkSpec",
    "Chain",
    "Experiment",
    "ExperimentError",
    "ExperimentSpec",
    "MethodSpec",
    "StageRun",
    "StageSpec",
    "deep_merge",
    "expand_overrides",
    "is_experiment_file",
    "load_experiment",
    "parse_experiment",
]
