//! One datum: its completion positions, its row loop (compiled twice, portable and AVX2) and
//! its dense or CSR output.

use ndarray::ArrayView1;
use std::ops::Range;

use super::config::Config;
use super::row::{renormalize, validate_and_filter, LogProduct, RowBuffer};
use super::sink::{CsrSink, CsrTargets, DenseSink, RowSink};
use super::teacher::Teacher;
use super::KernelError;

/// One student datum: its mask (length `N`), the completion slice and the teacher response.
#[derive(Debug, Clone)]
pub struct DatumInput<'a> {
    pub mask: ArrayView1<'a, f32>,
    /// `len(CompletionSlice.tokens)`.
    pub completion_len: usize,
    /// `CompletionSlice.teacher_prompt_len`: teacher row `q + t` predicts completion token `t`.
    pub teacher_prompt_len: usize,
    pub teacher: Teacher<'a>,
}

/// The student positions of a datum's completion tokens, in order: the indices `j` with
/// `mask[j] > 0`.
#[inline(always)]
pub fn completion_positions<'a>(mask: ArrayView1<'a, f32>) -> impl Iterator<Item = usize> + 'a {
    mask.into_iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .map(|(j, _)| j)
}

/// The teacher rows the kernel reads for a datum: `q + t` for `t` in `[skip_first_n, n)`.
/// (Rows past the end of the teacher's response are simply skipped.)
pub fn consulted_teacher_rows(
    mask: ArrayView1<'_, f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    skip_first_n: usize,
) -> Range<usize> {
    let positions = completion_positions(mask).count();
    let n = completion_len.min(positions);
    let first = skip_first_n.min(n);
    teacher_prompt_len.saturating_add(first)..teacher_prompt_len.saturating_add(n)
}

/// Counters summed over datums; the Python layer turns them into `sdft/...` metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Sum over datums of `n = min(len(slice.tokens), #mask positions)` (skipped ones included).
    pub completion_tokens: u64,
    /// Rows actually written.
    pub distilled_positions: u64,
    /// Positions `t < skip_first_n`.
    pub skipped_positions: u64,
    /// Positions whose teacher row is past the end, `None` or empty.
    pub missing_teacher_rows: u64,
    /// Positions whose taken entries were all dropped by the vocabulary filter.
    pub vocab_emptied_positions: u64,
    /// Entries (among the first `topk` of read rows) dropped because `id >= vocab_size`.
    pub vocab_filtered_ids: u64,
    /// Mask positions beyond the (truncated) completion slice: `#positions - n`.
    pub truncated_positions: u64,
    /// Sum over written rows of the renormalized teacher entropy `-sum p log p` (nats).
    pub entropy_sum: f64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.completion_tokens += other.completion_tokens;
        self.distilled_positions += other.distilled_positions;
        self.skipped_positions += other.skipped_positions;
        self.missing_teacher_rows += other.missing_teacher_rows;
        self.vocab_emptied_positions += other.vocab_emptied_positions;
        self.vocab_filtered_ids += other.vocab_filtered_ids;
        self.truncated_positions += other.truncated_positions;
        self.entropy_sum += other.entropy_sum;
    }
}

/// Where a completion position sits, for error messages.
pub fn position_context(t: usize, student_pos: usize, teacher_row: usize) -> String {
    format!("completion position {t} (student position {student_pos}, teacher row {teacher_row})")
}

/// Number of cells (`N * topk`) of a datum's dense output.
pub fn dense_cells(
    index: usize,
    input: &DatumInput<'_>,
    topk: usize,
) -> Result<usize, KernelError> {
    let rows = input.mask.len();
    rows.checked_mul(topk)
        .ok_or_else(|| KernelError::datum(index, "the (N, topk) output is too large"))
}

/// Builds one datum's dense targets into `target_tokens` / `weights`, which must be zero-filled
/// and `N * topk` long (row-major `(N, topk)`). `index` names the datum in error messages.
pub fn build_dense_datum(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    target_tokens: &mut [i64],
    weights: &mut [f32],
) -> Result<Stats, KernelError> {
    build_dense_datum_with(
        index,
        input,
        config,
        target_tokens,
        weights,
        &mut RowBuffer::new(config.topk),
    )
}

pub(super) fn build_dense_datum_with(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    target_tokens: &mut [i64],
    weights: &mut [f32],
    buffer: &mut RowBuffer,
) -> Result<Stats, KernelError> {
    let cells = dense_cells(index, input, config.topk)?;
    if target_tokens.len() != cells || weights.len() != cells {
        return Err(KernelError::internal(format!(
            "datum {index}: output buffers hold {} and {} cells, expected {cells}",
            target_tokens.len(),
            weights.len()
        )));
    }
    let mut sink = DenseSink {
        topk: config.topk,
        target_tokens,
        weights,
    };
    fill_rows(index, input, config, buffer, &mut sink)
}

/// Builds one datum's targets in CSR form.
pub fn build_csr_datum(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
) -> Result<(CsrTargets, Stats), KernelError> {
    build_csr_datum_with(index, input, config, &mut RowBuffer::new(config.topk))
}

pub(super) fn build_csr_datum_with(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
) -> Result<(CsrTargets, Stats), KernelError> {
    let rows = input.mask.len();
    let mut sink = CsrSink {
        crow: Vec::with_capacity(rows + 1),
        col: Vec::new(),
        target_tokens: Vec::new(),
        weights: Vec::new(),
    };
    sink.crow.push(0);
    let stats = fill_rows(index, input, config, buffer, &mut sink)?;
    sink.close_rows_until(rows);
    let targets = CsrTargets {
        rows,
        topk: config.topk,
        crow: sink.crow,
        col: sink.col,
        target_tokens: sink.target_tokens,
        weights: sink.weights,
    };
    Ok((targets, stats))
}

/// `fill_rows_body`, compiled for AVX2 when the CPU has it (4-lane f64 arithmetic in the exp and
/// the lane sums). Both copies perform identical IEEE operations: results are bit-identical.
fn fill_rows<S: RowSink>(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
    sink: &mut S,
) -> Result<Stats, KernelError> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { fill_rows_avx2(index, input, config, buffer, sink) };
        }
    }
    fill_rows_body(index, input, config, buffer, sink)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fill_rows_avx2<S: RowSink>(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
    sink: &mut S,
) -> Result<Stats, KernelError> {
    fill_rows_body(index, input, config, buffer, sink)
}

#[inline(always)]
pub(super) fn fill_rows_body(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
    sink: &mut impl RowSink,
) -> Result<Stats, KernelError> {
    let mut positions = 0usize;
    for (j, &m) in input.mask.iter().enumerate() {
        if !m.is_finite() {
            return Err(KernelError::datum(
                index,
                format!("mask[{j}] is {m}; mask values must be finite"),
            ));
        }
        if m > 0.0 {
            positions += 1;
        }
    }
    let n = input.completion_len.min(positions);
    let mut stats = Stats {
        completion_tokens: n as u64,
        truncated_positions: (positions - n) as u64,
        ..Stats::default()
    };
    // Entropy of the written rows: sum over rows of ln(total) - sum p (lp - max).
    let mut log_totals = LogProduct::new();
    let mut expected_shifts = 0.0f64;
    for (t, student_pos) in completion_positions(input.mask).take(n).enumerate() {
        if t < config.skip_first_n {
            stats.skipped_positions += 1;
            continue;
        }
        let teacher_row = input.teacher_prompt_len.saturating_add(t);
        input.teacher.read_row(index, teacher_row, buffer)?;
        if buffer.len == 0 {
            stats.missing_teacher_rows += 1;
            continue;
        }
        let taken = buffer.len;
        let (kept, max) = validate_and_filter(buffer, config.vocab_size).map_err(|bad| {
            KernelError::datum(
                index,
                format!(
                    "{}, entry {}: {}",
                    position_context(t, student_pos, teacher_row),
                    bad.entry,
                    bad.problem
                ),
            )
        })?;
        stats.vocab_filtered_ids += (taken - kept) as u64;
        if kept == 0 {
            stats.vocab_emptied_positions += 1;
            continue;
        }
        let row = renormalize(buffer, max);
        log_totals.multiply(row.total);
        expected_shifts += row.expected_shift;
        let exps = buffer.exps.get(..buffer.len).unwrap_or_default();
        sink.write_row(
            student_pos,
            buffer.ids(),
            exps,
            row.inverse_total,
            config.weight_scale,
        )?;
        stats.distilled_positions += 1;
    }
    stats.entropy_sum = log_totals.ln() - expected_shifts;
    Ok(stats)
}
