"""SDFT training data: examples, the loaders of every accepted format, and the batching dataset.

An :class:`SDFTExample` is one question the student answers and the golden answer only the
teacher sees. Accepted sources (``source_kind``):

``jsonl``
    One JSON object per line; the format is detected from the first row and every row must follow
    it (or pass ``fields`` to name the columns yourself):

    * PromptExample ``{"inputs": {"question": ...}, "expected": ...}``
    * TRL ``{"prompt": str | [messages], "privileged_context": str}``
    * plain ``{"question": ..., "golden_answer": ...}``

``hf``
    A ``datasets`` dataset saved with ``save_to_disk`` (``datasets.load_from_disk``); a
    ``DatasetDict`` needs ``split`` unless it has a single split.

``arrow``
    An Arrow IPC file (stream or file format, e.g. a ``save_to_disk`` shard), or a directory whose
    ``*.arrow`` shards are read in name order.

Values are converted the same way for every format:

* a question given as a list of chat messages (TRL conversational prompts, the paper's science
  set) must be ``[system?, user]``: the user message is the question and the system message, if
  any, becomes :attr:`SDFTExample.system_prompt`. Earlier user/assistant turns (few-shot chats) are
  rejected rather than dropped, since the trainer only builds ``[system, user]`` prompts and would
  otherwise train on a different prompt than the one in the file;
* a golden answer given as a list of strings is joined with newlines (the paper's tool-use
  ``golden_response``); a list of ``{"Action", "Action_Input"}`` records (the paper's tool-use
  ``golden_answer``) is rendered in the ReAct format its prompt asks for, one
  ``Action: <name>\\nAction Input: <json>`` pair per call.

Every malformed row raises ``ValueError`` whose message starts with the location: ``path:line:`` for
JSONL, ``path: row i:`` for datasets and Arrow files, ``rows[i]:`` for in-memory rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from sdft import _atomic

SourceKind = Literal["jsonl", "hf", "arrow"]
RowFormat = Literal["prompt_example", "trl", "simple", "mapped"]

#: Keys a field mapping may set, and the column each one reads when the mapping leaves it out.
MAPPABLE_FIELDS: dict[str, str | None] = {
    "question": "question",
    "golden_answer": "golden_answer",
    "id": None,
    "system_prompt": None,
}


@dataclass(frozen=True, slots=True)
class SDFTExample:
    """One training question, the golden answer shown to the teacher, and a stable row id."""

    question: str
    golden_answer: str
    id: str
    system_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class SDFTBatch:
    """Batch ``index`` of a dataset: the examples of epoch ``epoch`` in their shuffled order."""

    index: int
    epoch: int
    examples: tuple[SDFTExample, ...]

    @property
    def questions(self) -> list[str]:
        return [example.question for example in self.examples]

    @property
    def golden_answers(self) -> list[str]:
        return [example.golden_answer for example in self.examples]

    @property
    def ids(self) -> list[str]:
        return [example.id for example in self.examples]

    @property
    def system_prompts(self) -> list[str | None]:
        return [example.system_prompt for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------------
# Row conversion


def detect_row_format(row: Mapping[str, Any]) -> RowFormat | None:
    """The format of one row, from its keys; ``None`` when no known format matches."""
    if "inputs" in row and "expected" in row:
        return "prompt_example"
    if "prompt" in row and "privileged_context" in row:
        return "trl"
    if "question" in row and "golden_answer" in row:
        return "simple"
    return None


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} {field} must be a string, got {_describe(value)}")
    if not value.strip():
        raise ValueError(f"{where} {field} is empty")
    return value


def _question_and_system(value: Any, where: str, field: str) -> tuple[str, str | None]:
    """A question given as text or as a ``[system?, user]`` chat message list."""
    if isinstance(value, str):
        return _text(value, where, field), None
    if not isinstance(value, list):
        raise ValueError(
            f"{where} {field} must be a string or a list of chat messages, got {_describe(value)}"
        )
    if not value:
        raise ValueError(f"{where} {field} is an empty message list")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for position, message in enumerate(value):
        label = f"{field}[{position}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where} {label} must be a message {{'role': ..., 'content': ...}}")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"{where} {label}.content must be a string (text-only prompts), "
                f"got {_describe(content)}"
            )
        if role == "system":
            if position != 0:
                raise ValueError(f"{where} {label}: a system message must come first")
            system = content
        elif role in ("user", "assistant"):
            turns.append((role, content))
        else:
            raise ValueError(
                f"{where} {label}.role must be system, user or assistant, got {role!r}"
            )
    if not turns or turns[-1][0] != "user":
        raise ValueError(f"{where} {field} must end with a user message (the question)")
    if len(turns) > 1:
        raise ValueError(
            f"{where} {field} has {len(turns)} user/assistant turns; only single-turn prompts "
            "([system,] user) are supported"
        )
    return _text(turns[-1][1], where, f"{field} user message"), system


def _is_tool_call(item: Any) -> bool:
    return isinstance(item, Mapping) and set(item) == {"Action", "Action_Input"}


def _golden_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return _text("\n".join(value), where, field)
    if isinstance(value, list) and value and all(_is_tool_call(item) for item in value):
        lines = []
        for position, call in enumerate(value):
            action = _text(call["Action"], where, f"{field}[{position}].Action")
            arguments = call["Action_Input"]
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            lines.append(f"Action: {action}\nAction Input: {arguments}")
        return "\n".join(lines)
    if isinstance(value, list):
        raise ValueError(
            f"{where} {field} must be a string, a list of strings or a list of "
            "{Action, Action_Input} records"
        )
    return _text(value, where, field)


def _row_id(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{where} {field} must be a string or an integer, got {_describe(value)}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where} {field} is empty")
    return text


def _lookup(row: Mapping[str, Any], path: str, where: str, field: str) -> Any:
    """``row[path]``, where a dotted path walks nested mappings (a literal key wins)."""
    if path in row:
        return row[path]
    current: Any = row
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            missing = ".".join([*walked, part])
            mapped = "" if path == field else f" (mapped to {field})"
            raise ValueError(f"{where} missing field {missing!r}{mapped}")
        current = current[part]
        walked.append(part)
    return current


def validate_field_mapping(fields: Mapping[str, str]) -> dict[str, str]:
    """Check a user field mapping and return it as a plain dict."""
    if not isinstance(fields, Mapping):
        raise TypeError(f"field mapping must be a mapping, got {_describe(fields)}")
    unknown = sorted(set(fields) - set(MAPPABLE_FIELDS))
    if unknown:
        raise ValueError(
            f"field mapping: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(MAPPABLE_FIELDS)}"
        )
    for key, path in fields.items():
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"field mapping: {key} must name a column, got {path!r}")
    return dict(fields)


def example_from_row(
    row: Any,
    row_format: RowFormat,
    *,
    where: str,
    default_id: str,
    fields: Mapping[str, str] | None = None,
) -> SDFTExample:
    """Convert one row of a known format; errors start with ``where`` (e.g. ``path:3:``)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} expected a JSON object, got {_describe(row)}")
    system: str | None = None
    row_id = _row_id(row["id"], where, "id") if "id" in row else default_id
    if row_format == "prompt_example":
        inputs = row["inputs"]
        if not isinstance(inputs, Mapping):
            raise ValueError(f"{where} inputs must be an object, got {_describe(inputs)}")
        if "question" not in inputs:
            raise ValueError(f"{where} missing field 'inputs.question'")
        question, system = _question_and_system(inputs["question"], where, "inputs.question")
        golden = _golden_text(row["expected"], where, "expected")
    elif row_format == "trl":
        question, system = _question_and_system(row["prompt"], where, "prompt")
        golden = _golden_text(row["privileged_context"], where, "privileged_context")
    elif row_format == "simple":
        question, system = _question_and_system(row["question"], where, "question")
        golden = _golden_text(row["golden_answer"], where, "golden_answer")
        if row.get("system_prompt") is not None:
            system = _text(row["system_prompt"], where, "system_prompt")
    elif row_format == "mapped":
        mapping = {key: default for key, default in MAPPABLE_FIELDS.items() if default}
        mapping.update(fields or {})
        question, system = _question_and_system(
            _lookup(row, mapping["question"], where, "question"), where, mapping["question"]
        )
        golden_path = mapping["golden_answer"]
        golden = _golden_text(_lookup(row, golden_path, where, "golden_answer"), where, golden_path)
        if "id" in mapping:
            row_id = _row_id(_lookup(row, mapping["id"], where, "id"), where, mapping["id"])
        if "system_prompt" in mapping:
            path = mapping["system_prompt"]
            system = _text(_lookup(row, path, where, "system_prompt"), where, path)
    else:
        raise ValueError(f"unknown row format {row_format!r}")
    return SDFTExample(question=question, golden_answer=golden, id=row_id, system_prompt=system)


def _format_for(row: Any, where: str, fields: Mapping[str, str] | None) -> RowFormat:
    if fields is not None:
        return "mapped"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} expected a JSON object, got {_describe(row)}")
    detected = detect_row_format(row)
    if detected is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise ValueError(
            f"{where} cannot detect the data format from the keys ({keys}); expected "
            '{"inputs": {"question": ...}, "expected": ...} (PromptExample), '
            '{"prompt": ..., "privileged_context": ...} (TRL) or '
            '{"question": ..., "golden_answer": ...}, or pass a field mapping'
        )
    return detected


def _check_same_format(row: Any, where: str, row_format: RowFormat, first_where: str) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} expected a JSON object, got {_describe(row)}")
    if detect_row_format(row) != row_format:
        raise ValueError(
            f"{where} row does not match the {row_format} format detected at "
            f"{first_where.rstrip(':')}"
        )


LocatedExample = tuple[str, SDFTExample]


def _convert_rows(
    located_rows: Iterable[tuple[str, str, Any]],
    fields: Mapping[str, str] | None,
    source: str,
) -> list[LocatedExample]:
    """Convert ``(where, default_id, row)`` triples into ``(where, example)`` pairs; the first
    row decides the format."""
    if fields is not None:
        fields = validate_field_mapping(fields)
    examples: list[LocatedExample] = []
    first_seen: dict[str, str] = {}
    row_format: RowFormat | None = None
    first_where = ""
    for where, default_id, row in located_rows:
        if isinstance(row, SDFTExample):
            example = row
        else:
            if row_format is None:
                row_format = _format_for(row, where, fields)
                first_where = where
            elif fields is None:
                _check_same_format(row, where, row_format, first_where)
            example = example_from_row(
                row, row_format, where=where, default_id=default_id, fields=fields
            )
        if example.id in first_seen:
            raise ValueError(
                f"{where} duplicate id {example.id!r} (first used at "
                f"{first_seen[example.id].rstrip(':')})"
            )
        first_seen[example.id] = where
        examples.append((where, example))
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


# --------------------------------------------------------------------------------------------
# Loaders


def examples_from_rows(
    rows: Iterable[Mapping[str, Any] | SDFTExample],
    *,
    fields: Mapping[str, str] | None = None,
) -> list[SDFTExample]:
    """Examples from in-memory rows: :class:`SDFTExample` objects (kept as they are) or mappings
    of any accepted format. Default ids are the row positions (``"0"``, ``"1"``, ...)."""
    located = _convert_rows(
        ((f"rows[{i}]:", str(i), row) for i, row in enumerate(rows)), fields, "rows"
    )
    return _without_locations(located)


def _without_locations(located: list[LocatedExample]) -> list[SDFTExample]:
    return [example for _, example in located]


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} must be a file: {path}")


def iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    """The rows of a JSONL file as ``(location, line number, parsed row)``, blank lines skipped.

    ``location`` is ``"<path>:<line>:"``, the prefix of every error about that row; undecodable
    or invalid lines raise ``ValueError`` with it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}:"
            line = _atomic.decode_utf8(raw, where)
            if not line.strip():
                continue
            yield where, number, _atomic.parse_json_line(line, where)


def _jsonl_rows(path: Path) -> Iterable[tuple[str, str, Any]]:
    for where, number, row in iter_jsonl(path):
        yield where, f"{path.stem}:{number}", row


def load_jsonl_examples(
    path: str | os.PathLike[str], *, fields: Mapping[str, str] | None = None
) -> list[SDFTExample]:
    """Examples from a JSONL file; format auto-detected unless ``fields`` maps the columns.

    Default ids are ``<file stem>:<line number>``."""
    return _without_locations(_located_jsonl(path, fields))


def _located_jsonl(
    path: str | os.PathLike[str], fields: Mapping[str, str] | None
) -> list[LocatedExample]:
    target = Path(path)
    _require_file(target, "data file")
    return _convert_rows(_jsonl_rows(target), fields, str(target))


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
    except ImportError as exc:  # pragma: no cover - pyarrow comes with the 'local' extra
        raise ImportError(
            "reading Arrow files needs pyarrow: pip install 'sdft[local]' (or pyarrow)"
        ) from exc
    return pyarrow


def _read_arrow_table(path: Path) -> Any:
    pyarrow = _import_pyarrow()
    try:
        with pyarrow.memory_map(str(path)) as source:
            return pyarrow.ipc.open_stream(source).read_all()
    except pyarrow.ArrowInvalid:
        pass
    try:
        with pyarrow.memory_map(str(path)) as source:
            return pyarrow.ipc.open_file(source).read_all()
    except pyarrow.ArrowInvalid as exc:
        raise ValueError(f"{path}: not an Arrow IPC stream or file ({exc})") from exc


def load_arrow_examples(
    path: str | os.PathLike[str], *, fields: Mapping[str, str] | None = None
) -> list[SDFTExample]:
    """Examples from an Arrow IPC file (stream or file format) or a directory of ``*.arrow`` shards.

    Default ids are ``<file or directory name>:<row index>`` (0-based, counted across shards);
    error locations give the shard and its own row index."""
    return _without_locations(_located_arrow(path, fields))


def _located_arrow(
    path: str | os.PathLike[str], fields: Mapping[str, str] | None
) -> list[LocatedExample]:
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"Arrow data not found: {target}")
    shards = sorted(target.glob("*.arrow")) if target.is_dir() else [target]
    if not shards:
        raise FileNotFoundError(f"no *.arrow files in {target}")

    def rows() -> Iterable[tuple[str, str, Any]]:
        index = 0
        for shard in shards:
            for shard_row, row in enumerate(_read_arrow_table(shard).to_pylist()):
                yield f"{shard}: row {shard_row}:", f"{target.name}:{index}", row
                index += 1

    return _convert_rows(rows(), fields, str(target))


def load_hf_examples(
    path: str | os.PathLike[str],
    *,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
) -> list[SDFTExample]:
    """Examples from a ``datasets`` dataset saved with ``save_to_disk``.

    Default ids are ``<directory name>:<row index>``."""
    return _without_locations(_located_hf(path, fields, split))


def _located_hf(
    path: str | os.PathLike[str], fields: Mapping[str, str] | None, split: str | None
) -> list[LocatedExample]:
    target = Path(path)
    if not target.is_dir():
        raise FileNotFoundError(f"HF dataset directory not found: {target}")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with the 'local' extra
        raise ImportError("loading HF datasets needs: pip install 'sdft[local]'") from exc
    try:
        loaded = datasets.load_from_disk(str(target))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{target}: not a dataset saved with save_to_disk, or its data files are missing ({exc})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None:
            if len(names) != 1:
                raise ValueError(f"{target}: has splits {', '.join(names)}; set split")
            split = names[0]
        if split not in loaded:
            raise ValueError(f"{target}: no split {split!r} (splits: {', '.join(names)})")
        loaded = loaded[split]
    elif split is not None and loaded.split is not None and str(loaded.split) != split:
        raise ValueError(f"{target}: is the {loaded.split!r} split, not {split!r}")

    def rows() -> Iterable[tuple[str, str, Any]]:
        for index, row in enumerate(loaded):
            yield f"{target}: row {index}:", f"{target.name}:{index}", row

    return _convert_rows(rows(), fields, str(target))


def load_examples(
    path: str | os.PathLike[str],
    *,
    source_kind: SourceKind = "jsonl",
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
) -> list[SDFTExample]:
    """Load training examples from ``path`` (see the module docstring for the formats)."""
    return _without_locations(
        load_located_examples(path, source_kind=source_kind, fields=fields, split=split)
    )


def load_located_examples(
    path: str | os.PathLike[str],
    *,
    source_kind: SourceKind = "jsonl",
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
) -> list[LocatedExample]:
    """:func:`load_examples` with each example's location, ``(where, example)``: ``where`` is the
    prefix its error messages use (``data.jsonl:3:``, ``shard.arrow: row 2:``)."""
    if source_kind == "jsonl":
        if split is not None:
            raise ValueError("split applies to source_kind 'hf' only")
        return _located_jsonl(path, fields)
    if source_kind == "hf":
        return _located_hf(path, fields, split)
    if source_kind == "arrow":
        if split is not None:
            raise ValueError("split applies to source_kind 'hf' only")
        return _located_arrow(path, fields)
    raise ValueError(f"unknown source_kind {source_kind!r}; use jsonl, hf or arrow")


# --------------------------------------------------------------------------------------------
# Datasets


_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``range(size)`` for one epoch.

    Written out here (SplitMix64 seeded from a hash of ``seed`` and ``epoch``, then Fisher-Yates)
    rather than taken from ``random``/``numpy`` so the order, and therefore batch ``i`` of a resumed
    run, can never change with a library upgrade."""
    digest = hashlib.blake2b(f"sdft:{seed}:{epoch}".encode(), digest_size=8).digest()
    state = int.from_bytes(digest, "little")
    order = list(range(size))
    for i in range(size - 1, 0, -1):
        state, value = _splitmix64(state)
        j = value % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class SDFTDataset(ABC):
    """Batches of SDFT examples, addressed by a global batch index over all epochs.

    ``get_batch(i)`` must return the same batch every time it is called with the same
    construction arguments: a resumed run asks for batch ``i`` again after a restart."""

    batch_size: int
    num_epochs: int

    @abstractmethod
    def __len__(self) -> int:
        """The number of batches over all epochs."""

    @abstractmethod
    def get_batch(self, index: int) -> SDFTBatch:
        """Batch ``index`` (``0 <= index < len(self)``)."""


class SimpleSDFTDataset(SDFTDataset):
    """An in-memory dataset, reshuffled every epoch from ``seed``.

    ``rows`` are :class:`SDFTExample` objects or rows of any accepted format (usually
    ``{"question": ..., "golden_answer": ...}``). Each epoch is one pass over all examples in the
    order :func:`epoch_permutation` gives (identity when ``shuffle`` is false), cut into batches of
    ``batch_size``; the last batch of an epoch is smaller when the sizes do not divide, unless
    ``drop_last`` drops it. ``len(dataset) == batches_per_epoch * num_epochs``."""

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any] | SDFTExample],
        *,
        batch_size: int,
        num_epochs: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("num_epochs", num_epochs)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {_describe(value)}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {_describe(seed)}")
        self.examples: tuple[SDFTExample, ...] = tuple(examples_from_rows(rows, fields=fields))
        self.batch_size = batch_size
        self.num_epochs = num_epochs
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        size = len(self.examples)
        self.batches_per_epoch = size // batch_size if drop_last else -(-size // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {size} examples and drop_last is set: "
                "no batch would be produced"
            )
        self._order = lru_cache(maxsize=2)(self._epoch_order)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], **kwargs: Any) -> SimpleSDFTDataset:
        """A dataset from a JSONL file (PromptExample, TRL or plain rows; or ``fields=...``)."""
        fields = kwargs.pop("fields", None)
        return cls(load_jsonl_examples(path, fields=fields), **kwargs)

    @classmethod
    def from_source(
        cls,
        path: str | os.PathLike[str],
        *,
        source_kind: SourceKind = "jsonl",
        fields: Mapping[str, str] | None = None,
        split: str | None = None,
        **kwargs: Any,
    ) -> SimpleSDFTDataset:
        """A dataset from any accepted source (the config's ``data`` section)."""
        return cls(
            load_examples(path, source_kind=source_kind, fields=fields, split=split), **kwargs
        )

    def __len__(self) -> int:
        return self.batches_per_epoch * self.num_epochs

    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        if not self.shuffle:
            return tuple(range(len(self.examples)))
        return tuple(epoch_permutation(len(self.examples), self.seed, epoch))

    def get_batch(self, index: int) -> SDFTBatch:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"batch index must be an int, got {_describe(index)}")
        if not 0 <= index < len(self):
            raise IndexError(
                f"batch index {index} out of range: the dataset has {len(self)} batches"
            )
        epoch, position = divmod(index, self.batches_per_epoch)
        order = self._order(epoch)
        chosen = order[position * self.batch_size : (position + 1) * self.batch_size]
        return SDFTBatch(index=index, epoch=epoch, examples=tuple(self.examples[i] for i in chosen))


def batches(dataset: SDFTDataset, start: int = 0) -> Iterable[SDFTBatch]:
    """Batches ``start, start + 1, ...`` of ``dataset`` (resume passes the next step's index)."""
    for index in range(start, len(dataset)):
        yield dataset.get_batch(index)


__all__ = [
    "MAPPABLE_FIELDS",
    "SDFTBatch",
    "SDFTDataset",
    "SDFTExample",
    "SimpleSDFTDataset",
    "batches",
    "detect_row_format",
    "epoch_permutation",
    "example_from_row",
    "examples_from_rows",
    "load_arrow_examples",
    "load_examples",
    "load_hf_examples",
    "load_jsonl_examples",
    "load_located_examples",
    "validate_field_mapping",
]
