"""sdft: Self-Distillation Fine-Tuning with a Rust top-K kernel.

The data API (``from sdft import build_topk_targets, ...``) turns student rollouts and teacher
top-K responses into Tinker training datums; see :mod:`sdft.data`.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from sdft.data import (
    DEFAULT_DEMO_TEMPLATE,
    MAX_TOPK,
    CompletionSlice,
    build_importance_sampling_datums,
    build_reverse_kl_datums,
    build_student_prompt,
    build_teacher_forced_sequence,
    build_teacher_prompt,
    build_topk_targets,
    extract_completion_tokens,
    messages_to_model_input,
    strip_mask,
    student_datum_from_rollout,
)
from sdft.datasets import SDFTDataset, SimpleSDFTDataset

try:
    # The version is written once, in Cargo.toml; maturin puts it in the package metadata.
    __version__ = _distribution_version("sdft")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_DEMO_TEMPLATE",
    "MAX_TOPK",
    "CompletionSlice",
    "SDFTDataset",
    "SimpleSDFTDataset",
    "__version__",
    "build_importance_sampling_datums",
    "build_reverse_kl_datums",
    "build_student_prompt",
    "build_teacher_forced_sequence",
    "build_teacher_prompt",
    "build_topk_targets",
    "extract_completion_tokens",
    "messages_to_model_input",
    "strip_mask",
    "student_datum_from_rollout",
]
