//! The pure top-K kernel: a teacher's per-position top-K `(token_id, logprob)` rows in, the
//! student datum's `(N, K)` cross-entropy `target_tokens` / `weights` out.
//!
//! No PyO3 types live here: inputs are `ndarray` views and slices, outputs are owned `Vec`s or
//! caller-provided slices, so the whole module is tested with `cargo test --no-default-features`
//! and runs with the GIL released. Every fallible function returns [`KernelError`].
//!
//! Semantics (one datum, `N = mask.len()`, `q = teacher_prompt_len`):
//! completion positions are the indices `j` with `mask[j] > 0`, in order; `n = min(completion_len,
//! #positions)`. For `t` in `[skip_first_n, n)` the teacher row `q + t` is read (past the end,
//! `None` and empty rows are skipped); its first `topk` entries are taken, then ids `>= vocab_size`
//! are dropped; the survivors' log-probs are renormalized with a log-sum-exp in `f64` and written
//! left-aligned into output row `positions[t]`. Every other cell stays zero.
//!
//! Modules, each depending only on the ones before it: `config` (validated batch settings), `row`
//! (one row's entries: validation, vocabulary filter, renormalization), `teacher` (reading teacher
//! rows: dense arrays and the gathered list view), `sink` (dense and CSR outputs), `datum` (one
//! datum's row loop), `batch` (many datums on several threads).

mod batch;
mod config;
mod datum;
mod row;
mod sink;
mod teacher;

#[cfg(test)]
mod tests;

pub use crate::error::KernelError;
pub use batch::{build_csr_batch, build_dense_batch, dense_block_offsets, thread_count};
pub use config::Config;
pub use datum::{
    build_csr_datum, build_dense_datum, completion_positions, consulted_teacher_rows, dense_cells,
    position_context, DatumInput, Stats,
};
pub use row::{LogprobCell, TokenCell};
pub use sink::CsrTargets;
pub use teacher::{DenseRows, GatheredRows, RaggedRows, Teacher};

/// Version of the kernel (the crate version), exported to Python as `sdft._kernel.__version__`.
pub const KERNEL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest accepted `topk`: output rows are `topk` wide, so this bounds the allocation per
/// student position (4096 columns = 48 KiB per row) whatever the caller passes.
pub const MAX_TOPK: usize = 4096;

/// Log-prob of an empty cell in Tinker's dense top-K arrays (`tinker.types.topk_logprobs.MASK_LOGPROB`).
pub const SENTINEL_LOGPROB: f64 = -99999.0;

/// Token ids travel as int32 on Tinker's wire; anything outside `[0, MAX_TOKEN_ID]` is invalid.
pub const MAX_TOKEN_ID: i64 = i32::MAX as i64;

/// Largest accepted `weight_scale`: weights are float32 and a row's probabilities are at most 1,
/// so no written weight can overflow to `inf`.
pub const MAX_WEIGHT_SCALE: f64 = f32::MAX as f64;
