//! The pure top-K kernel: a teacher's per-position top-K `(token_id, logprob)` rows in, the
//! student datum's `(N, K)` cross-entropy `target_tokens` / `weights` out.
//!
//! No PyO3 types live here: inputs are `ndarray` views and slices, outputs are owned `Vec`s, so the
//! whole module is tested with `cargo test --no-default-features` and runs with the GIL released.
//!
//! Semantics (one datum, `N = mask.len()`, `q = teacher_prompt_len`):
//! completion positions are the indices `j` with `mask[j] > 0`, in order; `n = min(completion_len,
//! #positions)`. For `t` in `[skip_first_n, n)` the teacher row `q + t` is read (past the end,
//! `None` and empty rows are skipped); its first `topk` entries are taken, then ids `>= vocab_size`
//! are dropped; the survivors' log-probs are renormalized with a log-sum-exp in `f64` and written
//! left-aligned into output row `positions[t]`. Every other cell stays zero.

use ndarray::{ArrayView1, ArrayView2};
use std::fmt;
use std::ops::Range;

use crate::fast_exp;

/// Version of the kernel (the crate version), exported to Python as `sdft._kernel.__version__`.
pub const KERNEL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest accepted `topk`: output rows are `topk` wide, so this bounds the allocation per
/// student position (4096 columns = 48 KiB per row) whatever the caller passes.
pub const MAX_TOPK: usize = 4096;

/// Log-prob of an empty cell in Tinker's dense top-K arrays (`tinker.types.topk_logprobs.MASK_LOGPROB`).
pub const SENTINEL_LOGPROB: f64 = -99999.0;

/// Token ids travel as int32 on Tinker's wire; anything outside `[0, MAX_TOKEN_ID]` is invalid.
pub const MAX_TOKEN_ID: i64 = i32::MAX as i64;

/// Why a batch was rejected. Every message names the datum and, for per-value problems, the
/// completion position, the student position, the teacher row and the entry.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// A batch-wide argument is out of range (`topk`, `vocab_size`, `skip_first_n`, `weight_scale`).
    Argument(String),
    /// One datum's input is malformed.
    Datum { datum: usize, message: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Argument(message) => f.write_str(message),
            KernelError::Datum { datum, message } => write!(f, "datum {datum}: {message}"),
        }
    }
}

impl std::error::Error for KernelError {}

fn datum_error(datum: usize, message: String) -> KernelError {
    KernelError::Datum { datum, message }
}

/// Batch-wide settings, validated by [`Config::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Output width `K` and number of leading teacher entries taken per row.
    pub topk: usize,
    /// Ids `>= vocab_size` are dropped after the `topk` cut; `None` keeps every id.
    pub vocab_size: Option<i64>,
    /// The first `skip_first_n` completion positions are left at zero.
    pub skip_first_n: usize,
    /// Multiplies every written weight (mixing SDFT with another loss term).
    pub weight_scale: f64,
}

impl Config {
    /// Validates the arguments as a caller passes them (signed, possibly absurd).
    pub fn new(
        topk: i64,
        vocab_size: Option<i64>,
        skip_first_n: i64,
        weight_scale: f64,
    ) -> Result<Self, KernelError> {
        if topk < 1 || topk > MAX_TOPK as i64 {
            return Err(KernelError::Argument(format!(
                "topk must be between 1 and {MAX_TOPK}, got {topk}"
            )));
        }
        if let Some(vocab) = vocab_size {
            if vocab < 1 {
                return Err(KernelError::Argument(format!(
                    "vocab_size must be >= 1 (or None), got {vocab}"
                )));
            }
        }
        if skip_first_n < 0 {
            return Err(KernelError::Argument(format!(
                "skip_first_n must be >= 0, got {skip_first_n}"
            )));
        }
        if !weight_scale.is_finite() || weight_scale < 0.0 {
            return Err(KernelError::Argument(format!(
                "weight_scale must be a finite number >= 0, got {weight_scale}"
            )));
        }
        Ok(Config {
            topk: topk as usize,
            vocab_size,
            // Any skip beyond the address space is the same as skipping everything.
            skip_first_n: usize::try_from(skip_first_n).unwrap_or(usize::MAX),
            weight_scale,
        })
    }
}

/// A token-id cell type of a dense teacher array (`int32` from Tinker, `int64` accepted too).
pub trait TokenCell: Copy + Send + Sync {
    fn to_id(self) -> i64;
}

impl TokenCell for i32 {
    #[inline(always)]
    fn to_id(self) -> i64 {
        i64::from(self)
    }
}

impl TokenCell for i64 {
    #[inline(always)]
    fn to_id(self) -> i64 {
        self
    }
}

/// A log-prob cell type of a dense teacher array (`float32` from Tinker, `float64` accepted too).
pub trait LogprobCell: Copy + Send + Sync {
    fn to_logprob(self) -> f64;
}

impl LogprobCell for f32 {
    #[inline(always)]
    fn to_logprob(self) -> f64 {
        f64::from(self)
    }
}

impl LogprobCell for f64 {
    #[inline(always)]
    fn to_logprob(self) -> f64 {
        self
    }
}

#[inline(always)]
fn is_sentinel(id: i64, logprob: f64) -> bool {
    id == 0 && logprob == SENTINEL_LOGPROB
}

/// A teacher response in Tinker's dense form: `token_ids` and `logprobs`, both `(L, K)`, any
/// strides. Row `i` is the distribution that predicts token `i`; a row whose first cell is the
/// sentinel `(0, -99999.0)` is empty, and trailing sentinel cells are not entries (exactly
/// `tinker.types.topk_logprobs.topk_to_lists`).
#[derive(Debug, Clone)]
pub struct DenseRows<'a, I, F> {
    ids: ArrayView2<'a, I>,
    logprobs: ArrayView2<'a, F>,
}

impl<'a, I: TokenCell, F: LogprobCell> DenseRows<'a, I, F> {
    /// Pairs the two arrays; their shapes must agree.
    pub fn new(ids: ArrayView2<'a, I>, logprobs: ArrayView2<'a, F>) -> Result<Self, String> {
        if ids.shape() != logprobs.shape() {
            return Err(format!(
                "teacher token_ids shape {:?} and logprobs shape {:?} differ",
                ids.shape(),
                logprobs.shape()
            ));
        }
        Ok(DenseRows { ids, logprobs })
    }

    pub fn num_rows(&self) -> usize {
        self.ids.nrows()
    }

    /// Loads row `row`'s entries into `out` (none for an empty or out-of-range row).
    #[inline(always)]
    fn read_row(&self, row: usize, out: &mut RowBuffer) {
        if row >= self.ids.nrows() {
            return;
        }
        let ids = self.ids.row(row);
        let logprobs = self.logprobs.row(row);
        match (ids.as_slice(), logprobs.as_slice()) {
            (Some(ids), Some(logprobs)) => read_cell_slices(ids, logprobs, out),
            _ => read_cells(ids.iter(), logprobs.iter(), out),
        }
    }
}

/// `read_cells` for contiguous rows (the common case), without iterator adaptors.
#[inline(always)]
fn read_cell_slices<I: TokenCell, F: LogprobCell>(ids: &[I], logprobs: &[F], out: &mut RowBuffer) {
    let sentinel_at = |i: usize| match (ids.get(i), logprobs.get(i)) {
        (Some(id), Some(logprob)) => is_sentinel(id.to_id(), logprob.to_logprob()),
        _ => false,
    };
    let width = ids.len().min(logprobs.len());
    if width == 0 || sentinel_at(0) {
        return;
    }
    let mut end = width;
    while end > 1 && sentinel_at(end - 1) {
        end -= 1;
    }
    out.load_slices(ids, logprobs, end);
}

/// Reads a row's entries: none when its first cell is the sentinel; otherwise the cells up to the
/// last non-sentinel one (trailing sentinels are padding), at most `topk` of them.
fn read_cells<'c, I, F, II, FI>(ids: II, logprobs: FI, out: &mut RowBuffer)
where
    I: TokenCell + 'c,
    F: LogprobCell + 'c,
    II: DoubleEndedIterator<Item = &'c I> + ExactSizeIterator + Clone,
    FI: DoubleEndedIterator<Item = &'c F> + ExactSizeIterator + Clone,
{
    let mut cells = ids.clone().zip(logprobs.clone());
    match cells.next() {
        None => return,
        Some((id, logprob)) if is_sentinel(id.to_id(), logprob.to_logprob()) => return,
        Some(_) => {}
    }
    let width = ids.len();
    let trailing = ids
        .clone()
        .rev()
        .zip(logprobs.clone().rev())
        .take_while(|(id, logprob)| is_sentinel(id.to_id(), logprob.to_logprob()))
        .count();
    out.load(
        ids.zip(logprobs)
            .take(width - trailing)
            .map(|(id, logprob)| (id.to_id(), logprob.to_logprob())),
    );
}

/// A teacher response given as rows of `(token_id, logprob)` entries of varying length (the list
/// view, already converted to plain numbers). Only the window of rows the kernel will read needs
/// to be present: `spans[i]` describes teacher row `first_row + i` as a range into
/// `ids`/`logprobs`, or `None` for a `None` row. `num_rows` is the length of the original list.
#[derive(Debug, Clone)]
pub struct RaggedRows<'a> {
    pub num_rows: usize,
    pub first_row: usize,
    pub spans: &'a [Option<Range<usize>>],
    pub ids: &'a [i64],
    pub logprobs: &'a [f64],
}

impl RaggedRows<'_> {
    #[inline(always)]
    fn read_row(&self, datum: usize, row: usize, out: &mut RowBuffer) -> Result<(), KernelError> {
        if row >= self.num_rows {
            return Ok(());
        }
        let span = row
            .checked_sub(self.first_row)
            .and_then(|i| self.spans.get(i))
            .ok_or_else(|| {
                datum_error(
                    datum,
                    format!("teacher row {row} was not gathered (internal error)"),
                )
            })?;
        let Some(span) = span else { return Ok(()) };
        match (self.ids.get(span.clone()), self.logprobs.get(span.clone())) {
            (Some(ids), Some(logprobs)) => {
                out.load(ids.iter().copied().zip(logprobs.iter().copied()));
                Ok(())
            }
            _ => Err(datum_error(
                datum,
                format!("teacher row {row} spans past the gathered entries (internal error)"),
            )),
        }
    }
}

/// The teacher response of one datum.
#[derive(Debug, Clone)]
pub enum Teacher<'a> {
    /// No response (`None`): every position is skipped.
    Missing,
    DenseI32F32(DenseRows<'a, i32, f32>),
    DenseI32F64(DenseRows<'a, i32, f64>),
    DenseI64F32(DenseRows<'a, i64, f32>),
    DenseI64F64(DenseRows<'a, i64, f64>),
    Ragged(RaggedRows<'a>),
}

impl Teacher<'_> {
    /// Loads the first `topk` entries of teacher row `row` into `out` (`out.len = 0` when the
    /// row is missing, `None` or empty).
    #[inline(always)]
    fn read_row(&self, datum: usize, row: usize, out: &mut RowBuffer) -> Result<(), KernelError> {
        out.len = 0;
        match self {
            Teacher::Missing => {}
            Teacher::DenseI32F32(rows) => rows.read_row(row, out),
            Teacher::DenseI32F64(rows) => rows.read_row(row, out),
            Teacher::DenseI64F32(rows) => rows.read_row(row, out),
            Teacher::DenseI64F64(rows) => rows.read_row(row, out),
            Teacher::Ragged(rows) => rows.read_row(datum, row, out)?,
        }
        Ok(())
    }
}

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

/// The teacher rows the kernel reads for a datum: `q + t` for `t` in `[skip_first_n, n)`.
/// (Rows past the end of the teacher's response are simply skipped.)
pub fn consulted_teacher_rows(
    mask: ArrayView1<'_, f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    skip_first_n: usize,
) -> Range<usize> {
    let positions = mask.iter().filter(|&&m| m > 0.0).count();
    let n = completion_len.min(positions);
    let first = skip_first_n.min(n);
    teacher_prompt_len.saturating_add(first)..teacher_prompt_len.saturating_add(n)
}

/// The CSR form of one datum's `(N, K)` targets: only the written cells of distilled rows are
/// stored (`crow` has `rows + 1` entries, `col` one per stored cell); both tensors share the indices.
#[derive(Debug, Clone, PartialEq)]
pub struct CsrTargets {
    pub rows: usize,
    pub topk: usize,
    pub crow: Vec<i64>,
    pub col: Vec<i64>,
    pub target_tokens: Vec<i64>,
    pub weights: Vec<f32>,
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

/// The entries of the row being processed (the first `len` of each vector, at most `topk`) and
/// scratch space for their renormalization. Allocated once per batch (per worker thread).
#[derive(Debug)]
struct RowBuffer {
    ids: Vec<i64>,
    logprobs: Vec<f64>,
    exps: Vec<f64>,
    len: usize,
}

impl RowBuffer {
    fn new(topk: usize) -> Self {
        RowBuffer {
            ids: vec![0; topk],
            logprobs: vec![0.0; topk],
            exps: vec![0.0; topk],
            len: 0,
        }
    }

    /// Takes entries from `cells` until it has `topk` of them (the top-K cut).
    #[inline(always)]
    fn load(&mut self, cells: impl Iterator<Item = (i64, f64)>) {
        let mut len = 0;
        for ((id_slot, logprob_slot), (id, logprob)) in
            self.ids.iter_mut().zip(self.logprobs.iter_mut()).zip(cells)
        {
            *id_slot = id;
            *logprob_slot = logprob;
            len += 1;
        }
        self.len = len;
    }

    /// `load` for contiguous cells: the first `min(end, topk)` of them, in two plain loops.
    #[inline(always)]
    fn load_slices<I: TokenCell, F: LogprobCell>(&mut self, ids: &[I], logprobs: &[F], end: usize) {
        let take = end.min(self.ids.len()).min(ids.len()).min(logprobs.len());
        let (Some(id_slots), Some(logprob_slots), Some(ids), Some(logprobs)) = (
            self.ids.get_mut(..take),
            self.logprobs.get_mut(..take),
            ids.get(..take),
            logprobs.get(..take),
        ) else {
            self.len = 0;
            return;
        };
        for (slot, id) in id_slots.iter_mut().zip(ids) {
            *slot = id.to_id();
        }
        for (slot, logprob) in logprob_slots.iter_mut().zip(logprobs) {
            *slot = logprob.to_logprob();
        }
        self.len = take;
    }

    fn ids(&self) -> &[i64] {
        self.ids.get(..self.len).unwrap_or_default()
    }
}

/// Lane helpers: reductions over four interleaved lanes combined in a fixed order give the same
/// result on every CPU, without the serial dependency chain of a left-to-right loop.
#[inline(always)]
fn combine_sum(lanes: [f64; 4]) -> f64 {
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

#[inline(always)]
fn lane_max(values: &[f64]) -> f64 {
    let mut lanes = [f64::NEG_INFINITY; 4];
    let chunks = values.chunks_exact(4);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..4 {
            lanes[lane] = lanes[lane].max(chunk[lane]);
        }
    }
    for (lane, &value) in rest.iter().enumerate() {
        lanes[lane] = lanes[lane].max(value);
    }
    combine_max(lanes)
}

#[inline(always)]
fn combine_max(lanes: [f64; 4]) -> f64 {
    lanes[0].max(lanes[1]).max(lanes[2].max(lanes[3]))
}

/// Where a written row goes.
trait RowSink {
    /// Writes `ids` and the weights `(exps * inverse_total) * scale` (as f32) left-aligned into
    /// output row `row`; rows arrive in strictly increasing order.
    fn write_row(
        &mut self,
        row: usize,
        ids: &[i64],
        exps: &[f64],
        inverse_total: f64,
        scale: f64,
    ) -> Result<(), String>;
}

struct DenseSink<'o> {
    topk: usize,
    target_tokens: &'o mut [i64],
    weights: &'o mut [f32],
}

impl RowSink for DenseSink<'_> {
    #[inline(always)]
    fn write_row(
        &mut self,
        row: usize,
        ids: &[i64],
        exps: &[f64],
        inverse_total: f64,
        scale: f64,
    ) -> Result<(), String> {
        let start = row * self.topk;
        let end = start + ids.len();
        let (Some(tokens_out), Some(weights_out)) = (
            self.target_tokens.get_mut(start..end),
            self.weights.get_mut(start..end),
        ) else {
            return Err(format!("output row {row} is out of range (internal error)"));
        };
        for (out, &id) in tokens_out.iter_mut().zip(ids) {
            *out = id;
        }
        for (out, &e) in weights_out.iter_mut().zip(exps) {
            *out = ((e * inverse_total) * scale) as f32;
        }
        Ok(())
    }
}

struct CsrSink {
    crow: Vec<i64>,
    col: Vec<i64>,
    target_tokens: Vec<i64>,
    weights: Vec<f32>,
}

impl CsrSink {
    /// Extends the row pointers so that every row before `row` is closed (empty when not written).
    fn close_rows_until(&mut self, row: usize) {
        let stored = self.col.len() as i64;
        while self.crow.len() <= row {
            self.crow.push(stored);
        }
    }
}

impl RowSink for CsrSink {
    fn write_row(
        &mut self,
        row: usize,
        ids: &[i64],
        exps: &[f64],
        inverse_total: f64,
        scale: f64,
    ) -> Result<(), String> {
        if self.crow.len() > row + 1 {
            return Err(format!("output row {row} written twice (internal error)"));
        }
        self.close_rows_until(row);
        self.col.extend(0..ids.len() as i64);
        self.target_tokens.extend_from_slice(ids);
        self.weights
            .extend(exps.iter().map(|&e| ((e * inverse_total) * scale) as f32));
        Ok(())
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
    rows.checked_mul(topk).ok_or_else(|| {
        datum_error(
            index,
            format!("output of {rows} x {topk} cells is too large"),
        )
    })
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

fn build_dense_datum_with(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    target_tokens: &mut [i64],
    weights: &mut [f32],
    buffer: &mut RowBuffer,
) -> Result<Stats, KernelError> {
    let cells = dense_cells(index, input, config.topk)?;
    if target_tokens.len() != cells || weights.len() != cells {
        return Err(datum_error(
            index,
            format!(
                "output buffers hold {} and {} cells, expected {cells} (internal error)",
                target_tokens.len(),
                weights.len()
            ),
        ));
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

fn build_csr_datum_with(
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
unsafe fn fill_rows_avx2<S: RowSink>(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
    sink: &mut S,
) -> Result<Stats, KernelError> {
    fill_rows_body(index, input, config, buffer, sink)
}

#[inline(always)]
fn fill_rows_body(
    index: usize,
    input: &DatumInput<'_>,
    config: &Config,
    buffer: &mut RowBuffer,
    sink: &mut impl RowSink,
) -> Result<Stats, KernelError> {
    let mut positions = 0usize;
    for (j, &m) in input.mask.iter().enumerate() {
        if !m.is_finite() {
            return Err(datum_error(
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
    let completion_positions = input
        .mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .map(|(j, _)| j)
        .take(n);
    // Entropy of the written rows: sum over rows of ln(total) - sum p (lp - max).
    let mut log_totals = LogProduct::new();
    let mut expected_shifts = 0.0f64;
    for (t, student_pos) in completion_positions.enumerate() {
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
        let (kept, max) =
            validate_and_filter(buffer, config.vocab_size).map_err(|(entry, problem)| {
                datum_error(
                    index,
                    format!(
                        "{}, entry {entry}: {problem}",
                        position_context(t, student_pos, teacher_row)
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
        )
        .map_err(|message| datum_error(index, message))?;
        stats.distilled_positions += 1;
    }
    stats.entropy_sum = log_totals.ln() - expected_shifts;
    Ok(stats)
}

/// Checks every taken entry, then keeps (in order) the ones below `vocab_size`. Returns how many
/// were kept and their largest log-prob, or the first bad entry's index and what is wrong with it.
#[inline(always)]
fn validate_and_filter(
    buffer: &mut RowBuffer,
    vocab_size: Option<i64>,
) -> Result<(usize, f64), (usize, String)> {
    let len = buffer.len;
    let (Some(ids), Some(logprobs)) = (buffer.ids.get_mut(..len), buffer.logprobs.get_mut(..len))
    else {
        return Ok((0, f64::NEG_INFINITY));
    };
    // One branch-free pass for the common case: validity, the vocabulary test and the maximum
    // together. The first bad entry is looked up only on failure.
    let vocab = vocab_size.unwrap_or(i64::MAX);
    let (mut bad, mut outside_vocab) = (false, false);
    let mut max_lanes = [f64::NEG_INFINITY; 4];
    let mut check = |lane: usize, id: i64, logprob: f64| {
        bad |= !(0..=MAX_TOKEN_ID).contains(&id) | !logprob.is_finite();
        outside_vocab |= id >= vocab;
        max_lanes[lane] = max_lanes[lane].max(logprob);
    };
    let (id_chunks, logprob_chunks) = (ids.chunks_exact(4), logprobs.chunks_exact(4));
    let (id_rest, logprob_rest) = (id_chunks.remainder(), logprob_chunks.remainder());
    for (id_chunk, logprob_chunk) in id_chunks.zip(logprob_chunks) {
        for lane in 0..4 {
            check(lane, id_chunk[lane], logprob_chunk[lane]);
        }
    }
    for (lane, (&id, &logprob)) in id_rest.iter().zip(logprob_rest).enumerate() {
        check(lane, id, logprob);
    }
    if bad {
        return Err(first_bad_entry(ids, logprobs));
    }
    if !outside_vocab {
        return Ok((len, combine_max(max_lanes)));
    }
    let mut kept = 0;
    for read in 0..len {
        if ids[read] < vocab {
            ids[kept] = ids[read];
            logprobs[kept] = logprobs[read];
            kept += 1;
        }
    }
    buffer.len = kept;
    Ok((kept, lane_max(logprobs.get(..kept).unwrap_or_default())))
}

#[cold]
fn first_bad_entry(ids: &[i64], logprobs: &[f64]) -> (usize, String) {
    for (entry, (&id, &logprob)) in ids.iter().zip(logprobs).enumerate() {
        if !(0..=MAX_TOKEN_ID).contains(&id) {
            return (
                entry,
                format!("token id {id} is outside [0, {MAX_TOKEN_ID}]"),
            );
        }
        if !logprob.is_finite() {
            return (
                entry,
                format!("logprob is {logprob}; teacher logprobs must be finite"),
            );
        }
    }
    (0, "invalid entry (internal error)".to_string())
}

/// The renormalization of one row: `p = e / total = exp(lp - logsumexp(lp))` with
/// `e = exp(lp - max)`; its entropy is `-sum p log p = ln(total) - expected_shift`.
struct Renormalized {
    total: f64,
    inverse_total: f64,
    /// `sum p (lp - max)` (non-positive).
    expected_shift: f64,
}

/// Renormalizes the buffer's (finite, non-empty) log-probs, whose maximum is `max`, in `f64`,
/// leaving `e = exp(lp - max)` in `buffer.exps`.
#[inline(always)]
fn renormalize(buffer: &mut RowBuffer, max: f64) -> Renormalized {
    let len = buffer.len;
    let (Some(logprobs), Some(exps)) = (buffer.logprobs.get(..len), buffer.exps.get_mut(..len))
    else {
        return Renormalized {
            total: 1.0,
            inverse_total: 1.0,
            expected_shift: 0.0,
        };
    };
    for (e, &logprob) in exps.iter_mut().zip(logprobs) {
        *e = fast_exp::exp_non_positive(logprob - max);
    }
    let mut total_lanes = [0.0f64; 4];
    let mut weighted_lanes = [0.0f64; 4];
    let mut accumulate = |lane: usize, e: f64, logprob: f64| {
        total_lanes[lane] += e;
        // An entry whose exp flushed to 0 contributes nothing (its shifted log may be -inf).
        weighted_lanes[lane] += if e > 0.0 { e * (logprob - max) } else { 0.0 };
    };
    let (e_chunks, logprob_chunks) = (exps.chunks_exact(4), logprobs.chunks_exact(4));
    let (e_rest, logprob_rest) = (e_chunks.remainder(), logprob_chunks.remainder());
    for (e_chunk, logprob_chunk) in e_chunks.zip(logprob_chunks) {
        for lane in 0..4 {
            accumulate(lane, e_chunk[lane], logprob_chunk[lane]);
        }
    }
    for (lane, (&e, &logprob)) in e_rest.iter().zip(logprob_rest).enumerate() {
        accumulate(lane, e, logprob);
    }
    let total = combine_sum(total_lanes);
    let inverse_total = 1.0 / total;
    Renormalized {
        total,
        inverse_total,
        expected_shift: combine_sum(weighted_lanes) * inverse_total,
    }
}

/// `ln` of a product of numbers `>= 1`, kept as mantissa and binary exponent: one `ln` per datum
/// instead of one per row (the entropy needs `sum ln(total)` only).
struct LogProduct {
    mantissa: f64,
    exponent: i64,
}

impl LogProduct {
    fn new() -> Self {
        LogProduct {
            mantissa: 1.0,
            exponent: 0,
        }
    }

    /// Multiplies by a finite `factor >= 1` (a row total: the max entry contributes `exp(0)`).
    #[inline(always)]
    fn multiply(&mut self, factor: f64) {
        let bits = (self.mantissa * factor).to_bits();
        self.exponent += ((bits >> 52) & 0x7ff) as i64 - 1023;
        self.mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    }

    fn ln(&self) -> f64 {
        self.mantissa.ln() + self.exponent as f64 * std::f64::consts::LN_2
    }
}

/// Runs `work` item by item on up to `threads` threads, in contiguous groups balanced by `cost`.
/// Results come back in item order; the error of the lowest failing item wins, whatever thread
/// finished first, so the outcome never depends on scheduling.
fn run_in_groups<W, R, F>(
    work: Vec<W>,
    cost: &[usize],
    threads: usize,
    topk: usize,
    run: F,
) -> Result<Vec<R>, KernelError>
where
    W: Send,
    R: Send,
    F: Fn(usize, W, &mut RowBuffer) -> Result<R, KernelError> + Sync,
{
    let run_group = |first: usize, group: Vec<W>| -> Result<Vec<R>, KernelError> {
        let mut buffer = RowBuffer::new(topk);
        group
            .into_iter()
            .enumerate()
            .map(|(i, item)| run(first + i, item, &mut buffer))
            .collect()
    };
    let threads = threads.clamp(1, work.len().max(1));
    if threads == 1 {
        return run_group(0, work);
    }
    let total: usize = cost.iter().sum();
    let mut groups: Vec<(usize, Vec<W>)> = Vec::with_capacity(threads);
    let mut current = Vec::new();
    let (mut first, mut accumulated) = (0usize, 0usize);
    for (i, item) in work.into_iter().enumerate() {
        current.push(item);
        accumulated += cost.get(i).copied().unwrap_or(0);
        // Close the group once it holds its share of the total cost.
        if groups.len() + 1 < threads && accumulated * threads >= total * (groups.len() + 1) {
            groups.push((first, std::mem::take(&mut current)));
            first = i + 1;
        }
    }
    groups.push((first, current));

    let mut results: Vec<Result<Vec<R>, KernelError>> = Vec::with_capacity(groups.len());
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(groups.len());
        let mut groups = groups.into_iter();
        let head = groups.next();
        for (group_first, group) in groups {
            let run_group = &run_group;
            // A group whose thread cannot be started runs here, after the first one.
            let (sender, receiver) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                let group = receiver.recv().unwrap_or_default();
                run_group(group_first, group)
            });
            match spawned {
                Ok(handle) => {
                    let _ = sender.send(group);
                    handles.push(Worker::Thread(handle));
                }
                Err(_) => handles.push(Worker::Inline(group_first, group)),
            }
        }
        if let Some((group_first, group)) = head {
            results.push(run_group(group_first, group));
        }
        for worker in handles {
            results.push(match worker {
                Worker::Thread(handle) => handle.join().unwrap_or_else(|_| {
                    Err(KernelError::Argument(
                        "a kernel worker thread panicked (internal error)".into(),
                    ))
                }),
                Worker::Inline(group_first, group) => run_group(group_first, group),
            });
        }
    });
    let mut outputs = Vec::new();
    for result in results {
        outputs.extend(result?);
    }
    Ok(outputs)
}

enum Worker<'scope, W, R> {
    Thread(std::thread::ScopedJoinHandle<'scope, Result<Vec<R>, KernelError>>),
    Inline(usize, Vec<W>),
}

/// Builds every datum's dense targets into one pair of zero-filled buffers holding the datums'
/// `(N_i, topk)` blocks back to back (`sum N_i * topk` cells each), on up to `threads` threads.
/// `first_index` is the batch index of `inputs[0]` (for error messages).
pub fn build_dense_batch(
    inputs: &[DatumInput<'_>],
    first_index: usize,
    config: &Config,
    target_tokens: &mut [i64],
    weights: &mut [f32],
    threads: usize,
) -> Result<Stats, KernelError> {
    let cells = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| dense_cells(first_index + index, input, config.topk))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = cells.iter().sum();
    if target_tokens.len() != total || weights.len() != total {
        return Err(KernelError::Argument(format!(
            "output buffers hold {} and {} cells, expected {total} (internal error)",
            target_tokens.len(),
            weights.len()
        )));
    }
    let mut work = Vec::with_capacity(inputs.len());
    let (mut tokens_rest, mut weights_rest) = (target_tokens, weights);
    for (input, &n) in inputs.iter().zip(&cells) {
        let (tokens_block, tokens_tail) = tokens_rest.split_at_mut(n);
        let (weights_block, weights_tail) = weights_rest.split_at_mut(n);
        work.push((input, tokens_block, weights_block));
        tokens_rest = tokens_tail;
        weights_rest = weights_tail;
    }
    let per_datum = run_in_groups(
        work,
        &cells,
        threads,
        config.topk,
        |index, (input, tokens, weights), buffer| {
            build_dense_datum_with(first_index + index, input, config, tokens, weights, buffer)
        },
    )?;
    let mut total_stats = Stats::default();
    for stats in &per_datum {
        total_stats.add(stats);
    }
    Ok(total_stats)
}

/// Builds every datum's targets in CSR form, on up to `threads` threads. `first_index` is the
/// batch index of `inputs[0]` (for error messages).
pub fn build_csr_batch(
    inputs: &[DatumInput<'_>],
    first_index: usize,
    config: &Config,
    threads: usize,
) -> Result<(Vec<CsrTargets>, Stats), KernelError> {
    let cost: Vec<usize> = inputs.iter().map(|input| input.mask.len()).collect();
    let per_datum = run_in_groups(
        inputs.iter().collect(),
        &cost,
        threads,
        config.topk,
        |index, input, buffer| build_csr_datum_with(first_index + index, input, config, buffer),
    )?;
    let mut total_stats = Stats::default();
    let mut outputs = Vec::with_capacity(per_datum.len());
    for (targets, stats) in per_datum {
        total_stats.add(&stats);
        outputs.push(targets);
    }
    Ok((outputs, total_stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, Array2};

    const LN_07: f64 = -0.356_674_943_938_732_4; // ln 0.7
    const LN_02: f64 = -1.609_437_912_434_100_3; // ln 0.2
    const LN_01: f64 = -2.302_585_092_994_045_5; // ln 0.1

    fn config(topk: i64, vocab: Option<i64>, skip: i64) -> Config {
        Config::new(topk, vocab, skip, 1.0).expect("valid config")
    }

    fn dense(
        input: &DatumInput<'_>,
        cfg: &Config,
    ) -> Result<(Vec<i64>, Vec<f32>, Stats), KernelError> {
        let cells = input.mask.len() * cfg.topk;
        let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
        let stats = build_dense_datum(0, input, cfg, &mut tokens, &mut weights)?;
        Ok((tokens, weights, stats))
    }

    fn densify(csr: &CsrTargets) -> (Vec<i64>, Vec<f32>) {
        let mut tokens = vec![0i64; csr.rows * csr.topk];
        let mut weights = vec![0f32; csr.rows * csr.topk];
        for row in 0..csr.rows {
            for cell in csr.crow[row] as usize..csr.crow[row + 1] as usize {
                let at = row * csr.topk + csr.col[cell] as usize;
                tokens[at] = csr.target_tokens[cell];
                weights[at] = csr.weights[cell];
            }
        }
        (tokens, weights)
    }

    fn dense_input<'a>(
        mask: &'a ndarray::Array1<f32>,
        completion_len: usize,
        teacher_prompt_len: usize,
        teacher: Teacher<'a>,
    ) -> DatumInput<'a> {
        DatumInput {
            mask: mask.view(),
            completion_len,
            teacher_prompt_len,
            teacher,
        }
    }

    /// The tinker_contract.md §7 worked example: P = [11..14], C = [21..25], Q has 6 tokens; the
    /// fake teacher puts 0.7 on the true token of row i and 0.2 / 0.1 on decoys 1000+i / 2000+i.
    fn worked_example_teacher() -> (Array2<i32>, Array2<f32>) {
        let sequence = [91, 92, 93, 94, 95, 96, 21, 22, 23, 24, 25];
        let mut ids = Array2::<i32>::zeros((11, 3));
        let mut lps = Array2::<f32>::from_elem((11, 3), SENTINEL_LOGPROB as f32);
        for i in 1..11 {
            ids[[i, 0]] = sequence[i];
            ids[[i, 1]] = 1000 + i as i32;
            ids[[i, 2]] = 2000 + i as i32;
            lps[[i, 0]] = LN_07 as f32;
            lps[[i, 1]] = LN_02 as f32;
            lps[[i, 2]] = LN_01 as f32;
        }
        (ids, lps)
    }

    #[test]
    fn worked_example_alignment() {
        let (ids, lps) = worked_example_teacher();
        let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 5, 6, teacher);
        let (tokens, weights, stats) = dense(&input, &config(3, None, 0)).unwrap();
        for row in 0..3 {
            assert_eq!(&tokens[row * 3..row * 3 + 3], &[0, 0, 0]);
            assert_eq!(&weights[row * 3..row * 3 + 3], &[0.0, 0.0, 0.0]);
        }
        // Student position 3 + t <-> teacher row 6 + t <-> completion token 21 + t.
        for t in 0..5 {
            let row = 3 + t;
            let teacher_row = 6 + t as i64;
            assert_eq!(
                &tokens[row * 3..row * 3 + 3],
                &[21 + t as i64, 1000 + teacher_row, 2000 + teacher_row]
            );
            for (got, want) in weights[row * 3..row * 3 + 3].iter().zip([0.7, 0.2, 0.1]) {
                assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
        assert_eq!(stats.completion_tokens, 5);
        assert_eq!(stats.distilled_positions, 5);
        let entropy = -(0.7 * 0.7f64.ln() + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln());
        assert!((stats.entropy_sum - 5.0 * entropy).abs() < 1e-5);
    }

    #[test]
    fn hand_computed_renormalization_and_vocab_filter() {
        // Row 1: ids [5, 9, 7], probabilities 0.5, 0.3, 0.1; vocab 8 drops id 9, so the survivors
        // 0.5 and 0.1 renormalize to 5/6 and 1/6.
        let ids = Array2::from_shape_vec((2, 3), vec![0, 0, 0, 5, 9, 7]).unwrap();
        let lps = Array2::from_shape_vec(
            (2, 3),
            vec![
                -99999.0f32,
                -99999.0,
                -99999.0,
                0.5f32.ln(),
                0.3f32.ln(),
                0.1f32.ln(),
            ],
        )
        .unwrap();
        let mask = arr1(&[0.0f32, 1.0, 1.0]);
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 2, 0, teacher);
        let (tokens, weights, stats) = dense(&input, &config(4, Some(8), 0)).unwrap();
        // Completion position 0 reads teacher row 0: the sentinel row, so it is missing.
        assert_eq!(&tokens[4..8], &[0, 0, 0, 0]);
        assert_eq!(&tokens[8..12], &[5, 7, 0, 0]);
        assert!((weights[8] - 5.0 / 6.0).abs() < 1e-6);
        assert!((weights[9] - 1.0 / 6.0).abs() < 1e-6);
        assert_eq!(weights[10], 0.0);
        assert_eq!(stats.missing_teacher_rows, 1);
        assert_eq!(stats.vocab_filtered_ids, 1);
        assert_eq!(stats.distilled_positions, 1);
    }

    #[test]
    fn topk_cut_happens_before_vocab_filter() {
        // The first two entries are [100, 1]; vocab 50 drops 100, leaving id 1 alone with p = 1.
        let ids = Array2::from_shape_vec((1, 3), vec![100i64, 1, 2]).unwrap();
        let lps = Array2::from_shape_vec((1, 3), vec![-0.1f64, -1.0, -2.0]).unwrap();
        let mask = arr1(&[1.0f32]);
        let teacher = Teacher::DenseI64F64(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 1, 0, teacher);
        let (tokens, weights, _) = dense(&input, &config(2, Some(50), 0)).unwrap();
        assert_eq!(tokens, vec![1, 0]);
        assert_eq!(weights, vec![1.0, 0.0]);
    }

    #[test]
    fn sentinel_rules_match_topk_to_lists() {
        // Row 0: first cell sentinel -> empty even though a later cell is real.
        // Row 1: [a, S, b, S] -> entries a, S, b (a middle sentinel is an entry).
        let s = SENTINEL_LOGPROB as f32;
        let ids = Array2::from_shape_vec((2, 4), vec![0, 4, 0, 0, 3, 0, 5, 0]).unwrap();
        let lps = Array2::from_shape_vec((2, 4), vec![s, -1.0, s, s, -1.0, s, -2.0, s]).unwrap();
        let mask = arr1(&[1.0f32, 1.0]);
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 2, 0, teacher);
        let (tokens, weights, stats) = dense(&input, &config(4, None, 0)).unwrap();
        assert_eq!(&tokens[0..4], &[0, 0, 0, 0]);
        assert_eq!(&tokens[4..8], &[3, 0, 5, 0]);
        assert_eq!(weights[5], 0.0); // exp(-99999 - lse) flushes to exactly 0
        assert!((f64::from(weights[4]) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-6);
        assert_eq!(stats.missing_teacher_rows, 1);
    }

    #[test]
    fn ragged_and_dense_agree_and_csr_densifies_to_dense() {
        let (ids, lps) = worked_example_teacher();
        let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let cfg = config(2, Some(1008), 1);
        // Gather rows the way the binding does.
        let window = consulted_teacher_rows(mask.view(), 5, 6, cfg.skip_first_n);
        assert_eq!(window, 7..11);
        let mut spans = Vec::new();
        let (mut flat_ids, mut flat_lps) = (Vec::new(), Vec::new());
        for row in window.clone() {
            let start = flat_ids.len();
            for k in 0..3 {
                flat_ids.push(i64::from(ids[[row, k]]));
                flat_lps.push(f64::from(lps[[row, k]]));
            }
            spans.push(Some(start..flat_ids.len()));
        }
        let ragged = RaggedRows {
            num_rows: 11,
            first_row: window.start,
            spans: &spans,
            ids: &flat_ids,
            logprobs: &flat_lps,
        };
        let dense_rows = DenseRows::new(ids.view(), lps.view()).unwrap();
        let make = |teacher| DatumInput {
            mask: mask.view(),
            completion_len: 5,
            teacher_prompt_len: 6,
            teacher,
        };
        let (dense_tokens, dense_weights, dense_stats) =
            dense(&make(Teacher::DenseI32F32(dense_rows.clone())), &cfg).unwrap();
        let (ragged_tokens, ragged_weights, ragged_stats) =
            dense(&make(Teacher::Ragged(ragged)), &cfg).unwrap();
        let (csr, csr_stats) =
            build_csr_datum(0, &make(Teacher::DenseI32F32(dense_rows)), &cfg).unwrap();
        assert_eq!(
            (&dense_tokens, &dense_weights),
            (&ragged_tokens, &ragged_weights)
        );
        assert_eq!(dense_stats, ragged_stats);
        assert_eq!(dense_stats, csr_stats);
        assert_eq!(densify(&csr), (dense_tokens.clone(), dense_weights));
        // Row 4 (teacher row 7): decoy 1007 < 1008 kept; rows 5.. keep only the true token.
        assert_eq!(&dense_tokens[8..10], &[22, 1007]);
        assert_eq!(&dense_tokens[10..12], &[23, 0]);
        assert_eq!(dense_stats.skipped_positions, 1);
        assert_eq!(dense_stats.vocab_filtered_ids, 3);
        assert_eq!(csr.crow, vec![0, 0, 0, 0, 0, 2, 3, 4, 5]);
        assert_eq!(csr.col, vec![0, 1, 0, 0, 0]);
    }

    #[test]
    fn non_contiguous_views_give_the_same_result() {
        let (ids, lps) = worked_example_teacher();
        let ids_t = ids.t().to_owned(); // (3, 11); its transpose is a strided (11, 3) view
        let lps_t = lps.t().to_owned();
        let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let cfg = config(3, None, 0);
        let make = |teacher| DatumInput {
            mask: mask.view(),
            completion_len: 5,
            teacher_prompt_len: 6,
            teacher,
        };
        let contiguous = dense(
            &make(Teacher::DenseI32F32(
                DenseRows::new(ids.view(), lps.view()).unwrap(),
            )),
            &cfg,
        )
        .unwrap();
        let strided = dense(
            &make(Teacher::DenseI32F32(
                DenseRows::new(ids_t.t(), lps_t.t()).unwrap(),
            )),
            &cfg,
        )
        .unwrap();
        assert_eq!(contiguous, strided);
    }

    #[test]
    fn extreme_logprobs_stay_finite() {
        let ids = Array2::from_shape_vec((1, 4), vec![1i64, 2, 3, 4]).unwrap();
        let lps = Array2::from_shape_vec((1, 4), vec![1e308, -1e308, -1e4, 0.0]).unwrap();
        let mask = arr1(&[1.0f32]);
        let teacher = Teacher::DenseI64F64(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 1, 0, teacher);
        let (_, weights, stats) = dense(&input, &config(4, None, 0)).unwrap();
        assert_eq!(weights, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(stats.entropy_sum, 0.0);
    }

    #[test]
    fn bad_values_name_datum_and_position() {
        let mask = arr1(&[0.0f32, 1.0, 1.0]);
        let cfg = config(2, None, 0);
        let at = "datum 4: completion position 1 (student position 2, teacher row 3), entry 1";
        let cases: Vec<(i64, f64, String)> = vec![
            (
                -1,
                -0.5,
                format!("{at}: token id -1 is outside [0, 2147483647]"),
            ),
            (
                2_147_483_648,
                -0.5,
                format!("{at}: token id 2147483648 is outside [0, 2147483647]"),
            ),
            (
                7,
                f64::NAN,
                format!("{at}: logprob is NaN; teacher logprobs must be finite"),
            ),
            (
                7,
                f64::INFINITY,
                format!("{at}: logprob is inf; teacher logprobs must be finite"),
            ),
        ];
        for (bad_id, bad_lp, message) in cases {
            let ids = Array2::from_shape_vec((4, 2), vec![0, 0, 0, 0, 1, 2, 3, bad_id]).unwrap();
            let lps =
                Array2::from_shape_vec((4, 2), vec![0.0, 0.0, 0.0, 0.0, -0.1, -0.2, -0.3, bad_lp])
                    .unwrap();
            let teacher = Teacher::DenseI64F64(DenseRows::new(ids.view(), lps.view()).unwrap());
            let input = dense_input(&mask, 2, 2, teacher);
            let (mut tokens, mut weights) = (vec![0; 6], vec![0.0; 6]);
            let err = build_dense_datum(4, &input, &cfg, &mut tokens, &mut weights).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn bad_mask_and_shapes_are_errors() {
        let mask = arr1(&[0.0f32, f32::NAN]);
        let input = DatumInput {
            mask: mask.view(),
            completion_len: 1,
            teacher_prompt_len: 0,
            teacher: Teacher::Missing,
        };
        let (mut tokens, mut weights) = (vec![0; 4], vec![0.0; 4]);
        let err = build_dense_datum(1, &input, &config(2, None, 0), &mut tokens, &mut weights)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "datum 1: mask[1] is NaN; mask values must be finite"
        );

        let ids = Array2::<i32>::zeros((3, 2));
        let lps = Array2::<f32>::zeros((3, 3));
        let err = DenseRows::new(ids.view(), lps.view()).unwrap_err();
        assert_eq!(
            err,
            "teacher token_ids shape [3, 2] and logprobs shape [3, 3] differ"
        );

        let mask = arr1(&[1.0f32]);
        let input = DatumInput {
            mask: mask.view(),
            completion_len: 1,
            teacher_prompt_len: 0,
            teacher: Teacher::Missing,
        };
        let err = build_dense_datum(0, &input, &config(2, None, 0), &mut [0; 3], &mut [0.0; 2])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "datum 0: output buffers hold 3 and 2 cells, expected 2 (internal error)"
        );
    }

    #[test]
    fn config_rejects_bad_arguments() {
        let msg = |r: Result<Config, KernelError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(Config::new(0, None, 3, 1.0)),
            "topk must be between 1 and 4096, got 0"
        );
        assert_eq!(
            msg(Config::new(4097, None, 3, 1.0)),
            "topk must be between 1 and 4096, got 4097"
        );
        assert_eq!(
            msg(Config::new(20, Some(0), 3, 1.0)),
            "vocab_size must be >= 1 (or None), got 0"
        );
        assert_eq!(
            msg(Config::new(20, None, -1, 1.0)),
            "skip_first_n must be >= 0, got -1"
        );
        assert_eq!(
            msg(Config::new(20, None, 3, f64::NAN)),
            "weight_scale must be a finite number >= 0, got NaN"
        );
        assert_eq!(
            msg(Config::new(20, None, 3, -1.0)),
            "weight_scale must be a finite number >= 0, got -1"
        );
        assert_eq!(
            Config::new(20, None, i64::MAX, 2.0).unwrap().skip_first_n,
            i64::MAX as usize
        );
    }

    #[test]
    fn short_teacher_missing_teacher_truncation_and_skip_are_counted() {
        let ids = Array2::from_shape_vec((3, 1), vec![0, 1, 2]).unwrap();
        let lps = Array2::from_shape_vec((3, 1), vec![-99999.0f32, 0.0, 0.0]).unwrap();
        let mask = arr1(&[0.0f32, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // 5 mask positions, a slice of 4 tokens (truncated), teacher rows 0..3 only (q = 1).
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 4, 1, teacher);
        let (tokens, weights, stats) = dense(&input, &config(1, None, 1)).unwrap();
        assert_eq!(tokens, vec![0, 0, 2, 0, 0, 0]);
        assert_eq!(weights, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            stats,
            Stats {
                completion_tokens: 4,
                distilled_positions: 1,
                skipped_positions: 1,
                missing_teacher_rows: 2,
                vocab_emptied_positions: 0,
                vocab_filtered_ids: 0,
                truncated_positions: 1,
                entropy_sum: 0.0,
            }
        );
        let missing = DatumInput {
            teacher: Teacher::Missing,
            ..input
        };
        let (csr, stats) = build_csr_datum(0, &missing, &config(1, None, 0)).unwrap();
        assert_eq!(densify(&csr).0, vec![0; 6]);
        assert_eq!(csr.crow, vec![0; 7]);
        assert_eq!(stats.missing_teacher_rows, 4);
    }

    #[test]
    fn weight_scale_multiplies_weights_not_entropy() {
        let ids = Array2::from_shape_vec((1, 2), vec![1, 2]).unwrap();
        let lps = Array2::from_shape_vec((1, 2), vec![0.5f32.ln(), 0.5f32.ln()]).unwrap();
        let mask = arr1(&[1.0f32]);
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 1, 0, teacher);
        let cfg = Config::new(2, None, 0, 0.25).unwrap();
        let (_, weights, stats) = dense(&input, &cfg).unwrap();
        assert_eq!(weights, vec![0.125, 0.125]);
        assert!((stats.entropy_sum - std::f64::consts::LN_2).abs() < 1e-12);
    }

    /// A batch of ragged datums, built on 1 and on 3 threads, dense and CSR: identical results,
    /// and the lowest failing datum's error whatever the thread count.
    #[test]
    fn batches_are_deterministic_across_thread_counts() {
        let teachers: Vec<(Array2<i32>, Array2<f32>)> = (0..7)
            .map(|d| {
                let rows = 5 + d * 3;
                let ids =
                    Array2::from_shape_fn((rows, 4), |(r, k)| ((r * 7 + k * 13 + d) % 50) as i32);
                let lps = Array2::from_shape_fn((rows, 4), |(r, k)| {
                    -(((r + k + d) % 9) as f32) * 0.4 - k as f32
                });
                (ids, lps)
            })
            .collect();
        let masks: Vec<ndarray::Array1<f32>> = (0..7)
            .map(|d| ndarray::Array1::from_shape_fn(4 + d * 2, |j| if j >= 2 { 1.0 } else { 0.0 }))
            .collect();
        let inputs: Vec<DatumInput> = teachers
            .iter()
            .zip(&masks)
            .enumerate()
            .map(|(d, ((ids, lps), mask))| DatumInput {
                mask: mask.view(),
                completion_len: 2 + d,
                teacher_prompt_len: 3,
                teacher: Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap()),
            })
            .collect();
        let cfg = config(3, Some(40), 1);
        let cells: usize = masks.iter().map(|m| m.len() * 3).sum();
        let run_dense = |threads| {
            let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
            let stats =
                build_dense_batch(&inputs, 0, &cfg, &mut tokens, &mut weights, threads).unwrap();
            (tokens, weights, stats)
        };
        let single = run_dense(1);
        assert_eq!(single, run_dense(3));
        assert!(single.2.distilled_positions > 0 && single.2.vocab_filtered_ids > 0);
        let (csr_single, csr_stats) = build_csr_batch(&inputs, 0, &cfg, 1).unwrap();
        assert_eq!(
            (csr_single.clone(), csr_stats),
            build_csr_batch(&inputs, 0, &cfg, 3).unwrap()
        );
        let mut offset = 0;
        for (csr, mask) in csr_single.iter().zip(&masks) {
            let n = mask.len() * 3;
            assert_eq!(
                densify(csr),
                (
                    single.0[offset..offset + n].to_vec(),
                    single.1[offset..offset + n].to_vec()
                )
            );
            offset += n;
        }

        let bad = arr1(&[f32::NAN; 4]);
        let mut broken = inputs.clone();
        broken[2].mask = bad.view();
        broken[5].mask = bad.view();
        for threads in [1, 2, 3, 7] {
            let cells_broken: usize = broken.iter().map(|i| i.mask.len() * 3).sum();
            let (mut tokens, mut weights) = (vec![0i64; cells_broken], vec![0f32; cells_broken]);
            let err = build_dense_batch(&broken, 0, &cfg, &mut tokens, &mut weights, threads)
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "datum 2: mask[0] is NaN; mask values must be finite"
            );
            let err = build_csr_batch(&broken, 0, &cfg, threads).unwrap_err();
            assert_eq!(
                err.to_string(),
                "datum 2: mask[0] is NaN; mask values must be finite"
            );
        }
        // A sub-batch names its datums by their index in the whole batch.
        let err = build_csr_batch(&broken[3..], 3, &cfg, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "datum 5: mask[0] is NaN; mask values must be finite"
        );
    }

    /// The AVX2 and portable compilations of the row loop give bit-identical outputs and stats.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_row_loops_agree_bitwise() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let rows = 300;
        let ids = Array2::from_shape_fn((rows, 23), |(r, k)| ((r * 31 + k * 17) % 997) as i32);
        let lps = Array2::from_shape_fn((rows, 23), |(r, k)| {
            -(((r * 7 + k * 3) % 11) as f32) * 0.91
                - (k as f32) * 1.3
                - if k % 5 == 0 { 300.0 } else { 0.0 }
        });
        let mask = ndarray::Array1::from_shape_fn(rows - 1, |j| if j >= 40 { 1.0f32 } else { 0.0 });
        let teacher = Teacher::DenseI32F32(DenseRows::new(ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 250, 45, teacher);
        let cfg = Config::new(20, Some(900), 2, 0.75).unwrap();
        let cells = mask.len() * cfg.topk;
        let run = |avx2: bool| {
            let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
            let mut sink = DenseSink {
                topk: cfg.topk,
                target_tokens: &mut tokens,
                weights: &mut weights,
            };
            let mut buffer = RowBuffer::new(cfg.topk);
            let stats = if avx2 {
                // SAFETY: AVX2 support was checked at the top of the test.
                unsafe { fill_rows_avx2(0, &input, &cfg, &mut buffer, &mut sink) }
            } else {
                fill_rows_body(0, &input, &cfg, &mut buffer, &mut sink)
            }
            .unwrap();
            (
                tokens,
                weights.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                stats.entropy_sum.to_bits(),
                stats,
            )
        };
        let (portable, vectorized) = (run(false), run(true));
        assert!(portable.3.distilled_positions > 100 && portable.3.vocab_filtered_ids > 0);
        assert_eq!(portable, vectorized);
    }
}
