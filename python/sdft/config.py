"""The YAML run configuration: pydantic models, loading, validation messages, resolved dump.

The shape follows the EvSys SDFT walkthrough (``model``, ``backend``, ``algorithm.kind`` +
``params``, ``data``, ``metadata.benchmark``, ``output_dir``, ``seed``). Every mapping forbids
unknown keys. Errors are :class:`ConfigError` (a ``ValueError``) whose message names the file,
the line and the dotted key path, e.g.
``config.yaml:7: algorithm.params.learning_rate: must be greater than 0``.
Relative paths resolve against the directory of the config file.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sdft import _atomic
from sdft.data import DEFAULT_DEMO_TEMPLATE
from sdft.evals import parse_metric
from sdft.models import DEFAULT_MODEL
from sdft.runfiles import RESOLVED_CONFIG_NAME as RESOLVED_CONFIG_NAME

_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


class ConfigError(ValueError):
    """An invalid configuration; the message names the file, line and key path."""


# Sane upper bounds of the integer settings: far above any real run, low enough that a typo
# (``max_steps: 10**23``) fails here and not as an overflow deep inside torch or the SDK.
MAX_SEED = 2**63 - 1
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_GROUP = 1_024
MAX_RANK = 4_096
MAX_TOPK = 4_096
MAX_TOKENS = 1_048_576
MAX_CONTEXT = 2_097_152
MAX_SAMPLES = 1_024
MAX_TASKS = 1_000_000_000
MAX_TEMPERATURE = 100.0


class _Strict(BaseModel):
    # Strict: YAML already gives ints, floats and bools, so ``max_steps: true`` or ``"3"`` is a
    # mistake to report, not a value to coerce (an int is still accepted for a float).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
    )


# Paths come from YAML as strings: the one place where conversion is wanted.
ConfigPath = Annotated[Path, Field(strict=False)]


def _template_fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"is not a valid format string ({exc})") from exc


def _check_template(template: str, allowed: set[str], required: set[str]) -> str:
    fields = _template_fields(template)
    unknown = sorted(fields - allowed)
    if unknown:
        names = ", ".join("{" + name + "}" for name in unknown)
        allowed_names = ", ".join("{" + name + "}" for name in sorted(allowed))
        raise ValueError(f"uses unknown placeholder(s) {names}; allowed: {allowed_names}")
    missing = sorted(required - fields)
    if missing:
        raise ValueError(f"must contain {', '.join('{' + name + '}' for name in missing)}")
    return template


class ModelSection(_Strict):
    name: str = DEFAULT_MODEL

    @field_validator("name")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class BackendSection(_Strict):
    kind: Literal["local", "tinker"] = "local"
    base_url: str | None = None
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    checkpoint_root: ConfigPath | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"must be an http(s):// URL, not {value!r}")
        return value

    @model_validator(mode="after")
    def _base_url_only_for_tinker(self) -> BackendSection:
        if self.kind == "local" and self.base_url is not None:
            raise ValueError("base_url applies to kind: tinker only")
        return self


class TeacherSection(_Strict):
    mode: Literal["static", "sync", "ema"] = "static"
    sync_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    ema_alpha: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01

    @model_validator(mode="after")
    def _mode_options(self) -> TeacherSection:
        if self.mode == "sync" and self.sync_every is None:
            raise ValueError("mode: sync needs sync_every (steps between hard syncs)")
        if self.mode != "sync" and self.sync_every is not None:
            raise ValueError(f"sync_every applies to mode: sync, not mode: {self.mode}")
        if self.mode != "ema" and "ema_alpha" in self.model_fields_set:
            raise ValueError(f"ema_alpha applies to mode: ema, not mode: {self.mode}")
        return self


class AlgorithmParams(_Strict):
    learning_rate: Annotated[float, Field(gt=0.0)] = 2e-5
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 100
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 4
    group_size: Annotated[int, Field(ge=1, le=MAX_GROUP)] = 1
    lora_rank: Annotated[int, Field(ge=0, le=MAX_RANK)] | None = 32
    topk: Annotated[int, Field(ge=0, le=MAX_TOPK)] = 20
    skip_first_n: Annotated[int, Field(ge=0, le=MAX_TOKENS)] = 3
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] = 1.0
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 256
    max_context_length: Annotated[int, Field(ge=2, le=MAX_CONTEXT)] = 4096
    user_template: str = "{question}"
    demo_template: str = DEFAULT_DEMO_TEMPLATE
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    generate_from_teacher: bool = False
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    loss: Literal["cross_entropy", "reverse_kl", "full_kl"] = "cross_entropy"
    num_substeps: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 1
    save_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = 10
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip_norm: Annotated[float, Field(ge=0.0)] = 0.0
    weight_scale: Annotated[float, Field(gt=0.0)] = 1.0
    # How a step's requests are scheduled (sdft.schedules): streamed per question (the default) or
    # gathered phase by phase; same requests, same results. overlap_sampling samples the next batch
    # while the current one trains (one step off-policy, recorded as train/off_policy_steps).
    streaming: bool = True
    overlap_sampling: bool = False

    @field_validator("user_template")
    @classmethod
    def _user_template(cls, value: str) -> str:
        return _check_template(value, {"question"}, {"question"})

    @field_validator("demo_template")
    @classmethod
    def _demo_template(cls, value: str) -> str:
        return _check_template(value, {"question", "golden_answer"}, {"golden_answer"})

    @property
    def full_finetune(self) -> bool:
        """``lora_rank: null`` or ``0`` selects full fine-tuning."""
        return not self.lora_rank


class AlgorithmSection(_Strict):
    kind: Literal["sdft", "sft"] = "sdft"
    params: AlgorithmParams = Field(default_factory=AlgorithmParams)

    @model_validator(mode="after")
    def _loss_and_topk(self) -> AlgorithmSection:
        params = self.params
        if self.kind == "sft":
            if params.loss != "cross_entropy":
                raise ValueError("params.loss applies to kind: sdft; sft trains with cross_entropy")
            if params.overlap_sampling:
                raise ValueError(
                    "params.overlap_sampling applies to kind: sdft; sft does not sample"
                )
            return self
        if params.loss == "reverse_kl" and params.topk == 0:
            raise ValueError("params.loss: reverse_kl needs params.topk > 0")
        return self


class DataSection(_Strict):
    source_kind: Literal["jsonl", "hf", "arrow"] = "jsonl"
    path: ConfigPath
    fields: dict[str, str] | None = None
    split: str | None = None

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        from sdft.datasets import MAPPABLE_FIELDS

        unknown = sorted(set(value) - set(MAPPABLE_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(MAPPABLE_FIELDS)} "
                "(each maps to the column name used in your data)"
            )
        return value

    @model_validator(mode="after")
    def _split_only_for_hf(self) -> DataSection:
        if self.split is not None and self.source_kind != "hf":
            raise ValueError("split applies to source_kind: hf only")
        return self


#: The metrics of a ``kind: drift`` benchmark: ``kl`` is the sampled-token estimate of the mean
#: per-token KL(model || base) on the model's own samples, ``kl_full`` the exact full-vocabulary
#: value at the same positions (local backend only).
DRIFT_METRICS = ("kl", "kl_full")


class BenchmarkSection(_Strict):
    """``kind: tasks`` (default): ``path`` is a ``tasks.jsonl`` benchmark scored by its verifiers
    (``pass@K``); ``kind: drift``: ``path`` lists held-out prompts and the metrics are the drift
    from the base model (:mod:`sdft.drift`)."""

    name: str
    kind: Literal["tasks", "drift"] = "tasks"
    path: ConfigPath
    run_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    metrics: list[str] = Field(default_factory=lambda: ["pass@1"])
    split: str = "val"
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] = 1.0
    limit: Annotated[int, Field(ge=1, le=MAX_TASKS)] | None = None
    # Prompt rendering like training (algorithm.params.user_template) unless overridden here.
    user_template: str | None = None
    # Verifiers score the text after the last occurrence of this marker (a thinking model's final
    # answer) when the response contains it; null scores the whole response.
    answer_after: str | None = "</think>"

    @model_validator(mode="before")
    @classmethod
    def _default_metrics(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("kind") == "drift" and "metrics" not in data:
            return {**data, "metrics": ["kl"]}
        return data

    @field_validator("user_template")
    @classmethod
    def _user_template(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value, {"question"}, {"question"})

    @field_validator("answer_after")
    @classmethod
    def _answer_after(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must be a non-empty marker such as '</think>', or null")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _BENCHMARK_NAME.match(value):
            raise ValueError(
                f"{value!r} must be letters, digits, '_', '.' or '-' (it names output files)"
            )
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("must list at least one metric, e.g. [pass@1]")
        if info.data.get("kind") == "drift":
            unknown = [metric for metric in value if metric not in DRIFT_METRICS]
            if unknown:
                raise ValueError(
                    f"kind: drift has the metrics {', '.join(DRIFT_METRICS)}, not "
                    f"{', '.join(map(str, unknown))}"
                )
            return value
        for metric in value:
            if parse_metric(metric) > MAX_SAMPLES:
                raise ValueError(
                    f"{metric} needs more than {MAX_SAMPLES} samples per task; use a smaller K"
                )
        return value

    @model_validator(mode="after")
    def _drift_settings(self) -> BenchmarkSection:
        if self.kind != "drift":
            return self
        for key in ("user_template", "answer_after"):
            if key in self.model_fields_set and getattr(self, key) is not None:
                raise ValueError(f"{key} applies to kind: tasks; a drift prompt is sent as written")
        if "temperature" in self.model_fields_set and self.temperature != 1.0:
            raise ValueError(
                "kind: drift samples at temperature 1 (the KL is an expectation under the "
                "model's own distribution)"
            )
        return self

    @property
    def ks(self) -> list[int]:
        """The K of each ``pass@K`` metric, in order (``[1]`` for a drift benchmark: one sample
        per prompt)."""
        if self.kind == "drift":
            return [1]
        return [parse_metric(metric) for metric in self.metrics]

    @property
    def num_samples(self) -> int:
        return max(self.ks)


class MetadataSection(_Strict):
    benchmark: list[BenchmarkSection] = Field(default_factory=list)

    @field_validator("benchmark")
    @classmethod
    def _unique_names(cls, value: list[BenchmarkSection]) -> list[BenchmarkSection]:
        seen: set[str] = set()
        for entry in value:
            if entry.name in seen:
                raise ValueError(f"benchmark name {entry.name!r} is used twice")
            seen.add(entry.name)
        return value


class Config(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    data: DataSection
    metadata: MetadataSection = Field(default_factory=MetadataSection)
    output_dir: ConfigPath
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0

    @property
    def checkpoint_root(self) -> Path:
        return self.backend.checkpoint_root or self.output_dir / "checkpoints"

    @property
    def params(self) -> AlgorithmParams:
        return self.algorithm.params

    def resolved_dict(self) -> dict[str, Any]:
        """The config with every default filled in and paths absolute (JSON-compatible)."""
        data = self.model_dump(mode="json")
        data["backend"]["checkpoint_root"] = str(self.checkpoint_root)
        return data

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True)


NO_DEFAULT: Any = object()


def field_default(path: tuple[str, ...]) -> Any:
    """The default a config key takes when a file leaves it out (JSON form), ``NO_DEFAULT`` for a
    required key or a path that is not a config key; e.g. ``("algorithm", "params", "streaming")``
    gives ``True``."""
    model: type[BaseModel] = Config
    for depth, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:
            return NO_DEFAULT
        if depth == len(path) - 1:
            if field.is_required():
                return NO_DEFAULT
            value = field.get_default(call_default_factory=True)
            return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        nested = field.annotation
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            return NO_DEFAULT
        model = nested
    return NO_DEFAULT


def _resolve_path(base: Path, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~"))


def resolve_paths(config: Config, base_dir: Path) -> Config:
    """Make every relative path of ``config`` absolute against ``base_dir``."""
    base_dir = base_dir.resolve()
    config.data.path = _resolve_path(base_dir, config.data.path)  # type: ignore[assignment]
    for entry in config.metadata.benchmark:
        entry.path = _resolve_path(base_dir, entry.path)  # type: ignore[assignment]
    config.output_dir = _resolve_path(base_dir, config.output_dir)  # type: ignore[assignment]
    config.backend.checkpoint_root = _resolve_path(base_dir, config.backend.checkpoint_root)
    if _looks_like_path(config.model.name):
        config.model.name = str(_resolve_path(base_dir, Path(config.model.name)))
    return config


# --- YAML positions: map a key path to the line that defines it -------------------------------


def _node_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*prefix, key)] = key_node.start_mark.line + 1
            _node_lines(value_node, (*prefix, key), out)
            out[(*prefix, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, (*prefix, index), out)


def _yaml_lines(text: str) -> dict[tuple[Any, ...], int]:
    lines: dict[tuple[Any, ...], int] = {}
    try:
        loader, root = _compose_checked(text, "<config>")
    except (ConfigError, yaml.YAMLError, RecursionError):
        return lines
    loader.dispose()
    if root is not None:
        _node_lines(root, (), lines)
    return lines


# --- YAML loading: strict about what safe_load lets through -----------------------------------

#: The most nodes a config may expand to once its aliases are followed. A real config has a few
#: hundred; a "billion laughs" alias bomb of a few hundred bytes expands to billions.
MAX_YAML_NODES = 100_000

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _ConfigLoader(yaml.SafeLoader):
    """``SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 rules need
    ``1.0e-3`` and would otherwise hand the strict schema a string)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789")
)


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Reject recursive aliases and alias bombs (too many values once expanded), naming
    ``source:line``."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        line = node.start_mark.line + 1
        if key in active:
            raise ConfigError(f"{source}:{line}: a YAML alias refers to itself")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node) + size(value_node)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}:{line}: the YAML expands to more than {MAX_YAML_NODES} values once "
                "its aliases are followed (an alias bomb?)"
            )
        sizes[key] = total
        return total

    size(root)


def _check_duplicate_keys(root: yaml.Node, source: str) -> None:
    visited: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                pending.append(value_node)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first_line:
                    raise ConfigError(
                        f"{source}:{line}: duplicate key {key_node.value!r} (first defined at "
                        f"line {first_line[key_node.value]})"
                    )
                first_line[key_node.value] = line
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


def _compose_checked(text: str, source: str) -> tuple[_ConfigLoader, yaml.Node | None]:
    """The node tree of ``text``, checked; the caller disposes of the returned loader."""
    loader = _ConfigLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_nodes(root, source)
            _check_duplicate_keys(root, source)
    except BaseException:
        loader.dispose()
        raise
    return loader, root


def load_yaml(text: str, source: str) -> Any:
    """Parse config YAML safely: no duplicate keys, no alias bombs, ``1e-3`` is a float.

    Every problem is a :class:`ConfigError` starting with ``source:line``."""
    try:
        loader, root = _compose_checked(text, source)
        try:
            return None if root is None else loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read") from None


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The allowed keys of the mapping that contains ``loc`` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if _is_model(current) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        current = nested[0]
    return sorted(current.model_fields) if _is_model(current) else None


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


_TYPE_WORDS = {
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return names.get(type(value), type(value).__name__)


def _friendly(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind in _TYPE_WORDS:
        value = error.get("input")
        shown = f" {value!r}" if isinstance(value, str | int | float | bool) else ""
        return f"must be {_TYPE_WORDS[kind]}, got {_yaml_kind(value)}{shown}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be one of {expected}, not {error.get('input')!r}"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be ") :]
    return message[0].lower() + message[1:] if message else message


#: A setting that cannot be used: its key path (``("metadata", "benchmark", 0, "metrics")``) and
#: the message.
Problem = tuple[tuple[str | int, ...], str]


def capability_problems(config: Config) -> list[Problem]:
    """What the chosen backend cannot do: ``[(key path, message), ...]``.

    Full fine-tuning, the EMA teacher and the full-vocabulary KL run on the local backend only.
    """
    if config.backend.kind != "tinker":
        return []
    params = config.params
    problems: list[Problem] = []
    if params.full_finetune:
        problems.append(
            (
                ("algorithm", "params", "lora_rank"),
                "full fine-tuning (null or 0) needs backend.kind: local; Tinker trains LoRA "
                "adapters, set a rank such as 32",
            )
        )
    if config.algorithm.kind == "sdft" and params.loss == "full_kl":
        problems.append(
            (
                ("algorithm", "params", "loss"),
                "full_kl needs backend.kind: local (Tinker returns only top-K teacher log-probs)",
            )
        )
    if config.algorithm.kind == "sdft" and params.teacher.mode == "ema":
        problems.append(
            (
                ("algorithm", "params", "teacher", "mode"),
                "ema needs backend.kind: local; use static or sync with Tinker",
            )
        )
    for index, entry in enumerate(config.metadata.benchmark):
        if entry.kind == "drift" and "kl_full" in entry.metrics:
            problems.append(
                (
                    ("metadata", "benchmark", index, "metrics"),
                    "kl_full needs the full next-token distributions of the local backend; "
                    "on backend.kind: tinker use kl",
                )
            )
    return problems


def consistency_problems(config: Config) -> list[Problem]:
    """Settings that are valid one by one but not together: ``[(key path, message), ...]``."""
    params = config.params
    problems: list[Problem] = []
    if config.algorithm.kind == "sdft" and params.skip_first_n >= params.max_tokens:
        problems.append(
            (
                ("algorithm", "params", "skip_first_n"),
                f"skip_first_n ({params.skip_first_n}) must be less than max_tokens "
                f"({params.max_tokens}): the first skip_first_n completion tokens get no loss, "
                "so every step would train on 0 tokens",
            )
        )
    if params.max_tokens >= params.max_context_length:
        problems.append(
            (
                ("algorithm", "params", "max_tokens"),
                f"max_tokens ({params.max_tokens}) must be less than max_context_length "
                f"({params.max_context_length}), which also holds the prompt",
            )
        )
    return problems


def _key_path(loc: tuple[Any, ...]) -> str:
    """``("metadata", "benchmark", 0, "name")`` -> ``metadata.benchmark[0].name``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_errors(exc: ValidationError, source: str, lines: dict[tuple[Any, ...], int]) -> str:
    messages: list[tuple[int, str]] = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        # Model-level validators report at the enclosing mapping; their message names the keys.
        key = _key_path(loc)
        line = _line_for(loc, lines)
        where = f"{source}:{line}" if line is not None else source
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            messages.append((line or 0, f"{where}: {key}: unknown key{hint}"))
        else:
            messages.append((line or 0, f"{where}: {key}: {_friendly(error)}"))
    messages.sort(key=lambda item: item[0])
    return "\n".join(message for _, message in messages)


def parse_config(
    raw: Any, *, source: str = "<config>", base_dir: Path | None = None, text: str | None = None
) -> Config:
    """Validate an already-parsed YAML/JSON mapping; resolve relative paths against ``base_dir``."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else type(raw).__name__
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {kind}")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, _yaml_lines(text or ""))) from None
    _raise_problems(capability_problems(config) + consistency_problems(config), source, text)
    return resolve_paths(config, base_dir or Path.cwd())


def _raise_problems(problems: list[Problem], source: str, text: str | None) -> None:
    if not problems:
        return
    lines = _yaml_lines(text or "")
    messages = []
    for loc, message in problems:
        line = _line_for(loc, lines)
        where = f"{source}:{line}" if line is not None else source
        messages.append(f"{where}: {_key_path(loc)}: {message}")
    raise ConfigError("\n".join(messages))


def read_config_text(path: Path) -> str:
    """The text of a YAML file; non-UTF-8 bytes raise :class:`ConfigError` naming file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the config as "
            "UTF-8"
        ) from None


def _directory_problem(target: Path) -> str | None:
    """Why ``target`` cannot be (or become) a directory, or ``None``."""
    if target.exists():
        return None if target.is_dir() else f"{target} exists and is not a directory"
    for parent in target.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, so {target} cannot be created"
    return None


def filesystem_problems(config: Config) -> list[Problem]:
    """Run directories that cannot be used: ``[(key path, message), ...]``."""
    problems: list[Problem] = []
    candidates: list[tuple[tuple[str, ...], Path | None]] = [
        (("output_dir",), config.output_dir),
        (("backend", "checkpoint_root"), config.backend.checkpoint_root),
    ]
    for loc, target in candidates:
        problem = _directory_problem(target) if target is not None else None
        if problem:
            problems.append((loc, problem))
    return problems


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve the YAML config at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = read_config_text(path)
    raw = load_yaml(text, str(path))
    config = parse_config(raw, source=str(path), base_dir=path.parent, text=text)
    _raise_problems(filesystem_problems(config), str(path), text)
    return config


def write_resolved_config(config: Config, output_dir: Path | None = None) -> Path:
    """Write ``config.resolved.yaml`` (defaults filled in, absolute paths) into the run directory."""
    target = (output_dir or config.output_dir) / RESOLVED_CONFIG_NAME
    _atomic.write_text(target, config.resolved_yaml())
    return target


# Paths that must name the same file on resume. A project copied or moved as a whole (config,
# data and output_dir together) keeps them in the same place relative to output_dir.
_RELOCATABLE_PATHS = {("data", "path"), ("backend", "checkpoint_root"), ("model", "name")}


def _same_place(a: Any, b: Any, old_root: Any, new_root: Any) -> bool:
    if a == b:
        return True
    if not all(isinstance(value, str) for value in (a, b, old_root, new_root)):
        return False
    if not (Path(a).is_absolute() and Path(b).is_absolute()):
        return False
    return os.path.relpath(a, old_root) == os.path.relpath(b, new_root)


def training_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Key paths whose values differ between two resolved configs, ignoring what a resumed run may
    change: ``max_steps``, ``save_every``, the benchmarks, ``output_dir``, the device, ``base_url``
    and the step's scheduling (``streaming``, ``overlap_sampling``).

    Paths (data, checkpoint root, a local model directory) are compared relative to each config's
    ``output_dir`` when they differ as absolute paths, so a project folder copied or moved with
    ``cp -a``/``mv`` still resumes."""
    ignored = {
        ("algorithm", "params", "max_steps"),
        ("algorithm", "params", "save_every"),
        ("metadata",),
        ("output_dir",),
        ("backend", "device"),
        ("backend", "base_url"),
        ("algorithm", "params", "streaming"),
        ("algorithm", "params", "overlap_sampling"),
    }
    old_root, new_root = old.get("output_dir"), new.get("output_dir")
    differences: list[str] = []

    def walk(a: Any, b: Any, prefix: tuple[str, ...]) -> None:
        if prefix in ignored:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), (*prefix, key))
        elif prefix in _RELOCATABLE_PATHS:
            if not _same_place(a, b, old_root, new_root):
                differences.append(".".join(prefix))
        elif a != b:
            differences.append(".".join(prefix))

    walk(old, new, ())
    return differences
