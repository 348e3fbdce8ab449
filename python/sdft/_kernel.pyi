"""Typing for the Rust extension ``sdft._kernel`` (rust/python.rs).

Exception policy: ``TypeError`` for a Python object of the wrong type or dtype, ``ValueError`` for a
well-typed value that is out of range, of the wrong shape or inconsistent (per-datum messages start
with ``datum <i>:`` and name the position), ``RuntimeError`` for a broken internal invariant (a bug).
"""

from typing import Any, TypeAlias, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_TOKEN_ID",
    "MAX_TOPK",
    "SENTINEL_LOGPROB",
    "OutputBuffer",
    "__version__",
    "build_topk_batch",
]

__version__: str
MAX_TOPK: int
"""Largest accepted ``topk``."""
MAX_TOKEN_ID: int
"""Largest valid token id (int32 max: ids travel as int32 on Tinker's wire)."""
SENTINEL_LOGPROB: float
"""Log-prob of an empty cell in Tinker's dense top-K arrays (with token id 0)."""

_ListViewRows: TypeAlias = list[list[tuple[int, float]] | tuple[tuple[int, float], ...] | None]
_DenseTeacher: TypeAlias = tuple[
    npt.NDArray[np.int32 | np.int64], npt.NDArray[np.float32 | np.float64]
]
_DatumItem: TypeAlias = tuple[
    npt.NDArray[np.float32], int, int, _ListViewRows | _DenseTeacher | None
]
_DenseOutput: TypeAlias = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
_CsrOutput: TypeAlias = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]
]

def build_topk_batch(
    datums: list[_DatumItem],
    *,
    topk: int,
    vocab_size: int | None,
    skip_first_n: int,
    weight_scale: float,
    sparse: bool,
    threads: int = 0,
) -> tuple[list[_DenseOutput] | list[_CsrOutput], dict[str, Any]]:
    """Build the ``(N, topk)`` targets of a batch with the GIL released.

    ``datums``: per datum ``(mask, completion_len, teacher_prompt_len, teacher)`` with ``mask`` a
    1-D float32 array of length ``N`` and ``teacher`` None, the list view (a ``list`` of rows) or a
    ``(token_ids, logprobs)`` tuple of 2-D arrays; ``completion_len`` and ``teacher_prompt_len`` are
    ints in ``[0, 2**63)``. ``weight_scale`` must be in ``[0, float32 max]`` (weights are float32).
    Returns per datum ``(target_tokens, weights)`` (``sparse=False``) or ``(crow_indices,
    col_indices, target_token_values, weight_values)`` (``sparse=True``), and the counters ``completion_tokens``, ``distilled_positions``,
    ``skipped_positions``, ``missing_teacher_rows``, ``vocab_emptied_positions``,
    ``vocab_filtered_ids``, ``truncated_positions`` (ints) and ``entropy_sum`` (float).
    Dense outputs are views into one buffer per tensor kind (an :class:`OutputBuffer`, their
    ``.base``). ``threads=0`` picks one thread per core (up to 8) for batches of 4096+ rows; the
    result never depends on the thread count.
    """

@final
class OutputBuffer:
    """Owner of a batch's dense output memory (the ``.base`` of the returned arrays)."""

    @property
    def nbytes(self) -> int: ...
