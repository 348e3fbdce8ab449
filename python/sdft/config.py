"""The YAML run configuration: pydantic models, loading, validation messages, resolved dump.

The shape follows the EvSys SDFT walkthrough (``model``, ``backend``, ``algorithm.kind`` +
``params``, ``data``, ``metadata.benchmark``, ``output_dir``, ``seed``). Every mapping forbids
unknown keys. Errors are :class:`ConfigError` (a ``ValueError``) whose message names the file,
the line and the dotted key path, e.g.
``config.yaml:7: algorithm.params.learning_rate: must be greater than 0``.
Relative paths resolve against the directory of the config file.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdft import _atomic
from sdft.data import DEFAULT_DEMO_TEMPLATE

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RESOLVED_CONFIG_NAME = "config.resolved.yaml"

_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PASS_AT_K = re.compile(r"^pass@([1-9][0-9]*)$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


class ConfigError(ValueError):
    """An invalid configuration; the message names the file, line and key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    checkpoint_root: Path | None = None

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
    sync_every: Annotated[int, Field(ge=1)] | None = None
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
    max_steps: Annotated[int, Field(ge=1)] = 100
    batch_size: Annotated[int, Field(ge=1)] = 4
    group_size: Annotated[int, Field(ge=1)] = 1
    lora_rank: Annotated[int, Field(ge=0)] | None = 32
    topk: Annotated[int, Field(ge=0)] = 20
    skip_first_n: Annotated[int, Field(ge=0)] = 3
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    max_tokens: Annotated[int, Field(ge=1)] = 256
    max_context_length: Annotated[int, Field(ge=2)] = 4096
    user_template: str = "{question}"
    demo_template: str = DEFAULT_DEMO_TEMPLATE
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    generate_from_teacher: bool = False
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    loss: Literal["cross_entropy", "reverse_kl", "full_kl"] = "cross_entropy"
    num_substeps: Annotated[int, Field(ge=1)] = 1
    save_every: Annotated[int, Field(ge=1)] | None = 10
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip_norm: Annotated[float, Field(ge=0.0)] = 0.0
    weight_scale: Annotated[float, Field(gt=0.0)] = 1.0

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
            return self
        if params.loss == "reverse_kl" and params.topk == 0:
            raise ValueError("params.loss: reverse_kl needs params.topk > 0")
        return self


class DataSection(_Strict):
    source_kind: Literal["jsonl", "hf", "arrow"] = "jsonl"
    path: Path
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


class BenchmarkSection(_Strict):
    name: str
    path: Path
    run_every: Annotated[int, Field(ge=1)] | None = None
    metrics: list[str] = Field(default_factory=lambda: ["pass@1"])
    split: str = "val"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    limit: Annotated[int, Field(ge=1)] | None = None

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
    def _metrics(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one metric, e.g. [pass@1]")
        for metric in value:
            if not _PASS_AT_K.match(metric):
                raise ValueError(f"unknown metric {metric!r}; use pass@K (pass@1, pass@4, ...)")
        return value

    @property
    def ks(self) -> list[int]:
        """The K of each ``pass@K`` metric, in order."""
        return [int(_PASS_AT_K.match(metric).group(1)) for metric in self.metrics]  # type: ignore[union-attr]

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
    output_dir: Path
    seed: int = 0

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
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        _node_lines(root, (), lines)
    return lines


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
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        current = nested[0]
    return sorted(current.model_fields) if isinstance(current, type) else None


def _friendly(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be one of {expected}, not {error.get('input')!r}"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be ") :]
    return message[0].lower() + message[1:] if message else message


def capability_problems(config: Config) -> list[tuple[tuple[str, ...], str]]:
    """What the chosen backend cannot do: ``[(key path, message), ...]``.

    Full fine-tuning, the EMA teacher and the full-vocabulary KL run on the local backend only.
    """
    if config.backend.kind != "tinker":
        return []
    params = config.params
    problems = []
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
    problems = capability_problems(config)
    if problems:
        lines = _yaml_lines(text or "")
        messages = []
        for loc, message in problems:
            line = _line_for(loc, lines)
            where = f"{source}:{line}" if line is not None else source
            messages.append(f"{where}: {_key_path(loc)}: {message}")
        raise ConfigError("\n".join(messages))
    return resolve_paths(config, base_dir or Path.cwd())


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve the YAML config at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    return parse_config(raw, source=str(path), base_dir=path.parent, text=text)


def write_resolved_config(config: Config, output_dir: Path | None = None) -> Path:
    """Write ``config.resolved.yaml`` (defaults filled in, absolute paths) into the run directory."""
    target = (output_dir or config.output_dir) / RESOLVED_CONFIG_NAME
    _atomic.write_text(target, config.resolved_yaml())
    return target


def training_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Key paths whose values differ between two resolved configs, ignoring what a resumed run may
    change: ``max_steps``, ``save_every``, the benchmarks, ``output_dir``, the device, ``base_url``."""
    ignored = {
        ("algorithm", "params", "max_steps"),
        ("algorithm", "params", "save_every"),
        ("metadata",),
        ("output_dir",),
        ("backend", "device"),
        ("backend", "base_url"),
    }
    differences: list[str] = []

    def walk(a: Any, b: Any, prefix: tuple[str, ...]) -> None:
        if prefix in ignored:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), (*prefix, key))
        elif a != b:
            differences.append(".".join(prefix))

    walk(old, new, ())
    return differences
