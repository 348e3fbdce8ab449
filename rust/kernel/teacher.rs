//! Reading teacher rows: Tinker's dense `(L, K)` arrays (any strides, int32/int64 ids,
//! float32/float64 log-probs) and the list view, gathered into flat numbers by the binding.

use ndarray::ArrayView2;
use std::ops::Range;

use super::row::{LogprobCell, RowBuffer, TokenCell};
use super::{KernelError, SENTINEL_LOGPROB};

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
    /// Pairs datum `datum`'s two arrays; their shapes must agree.
    pub fn new(
        datum: usize,
        ids: ArrayView2<'a, I>,
        logprobs: ArrayView2<'a, F>,
    ) -> Result<Self, KernelError> {
        if ids.shape() != logprobs.shape() {
            return Err(KernelError::datum(
                datum,
                format!(
                    "teacher token_ids shape {:?} and logprobs shape {:?} differ",
                    ids.shape(),
                    logprobs.shape()
                ),
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
                KernelError::internal(format!("datum {datum}: teacher row {row} was not gathered"))
            })?;
        let Some(span) = span else { return Ok(()) };
        match (self.ids.get(span.clone()), self.logprobs.get(span.clone())) {
            (Some(ids), Some(logprobs)) => {
                out.load(ids.iter().copied().zip(logprobs.iter().copied()));
                Ok(())
            }
            _ => Err(KernelError::internal(format!(
                "datum {datum}: teacher row {row} spans past the gathered entries"
            ))),
        }
    }
}

/// Owned storage behind a [`RaggedRows`]: the consulted rows of one list-view teacher, filled row
/// by row. One is reused for every list-view datum of a batch, so at most one datum's converted
/// rows exist at a time.
#[derive(Debug, Default)]
pub struct GatheredRows {
    num_rows: usize,
    first_row: usize,
    row_start: usize,
    spans: Vec<Option<Range<usize>>>,
    ids: Vec<i64>,
    logprobs: Vec<f64>,
}

impl GatheredRows {
    /// Forgets the previous teacher; rows `first_row..` of a list of `num_rows` rows follow.
    pub fn start(&mut self, num_rows: usize, first_row: usize) {
        self.num_rows = num_rows;
        self.first_row = first_row;
        self.row_start = 0;
        self.spans.clear();
        self.ids.clear();
        self.logprobs.clear();
    }

    /// Appends an entry to the row being gathered.
    #[inline]
    pub fn push_entry(&mut self, id: i64, logprob: f64) {
        self.ids.push(id);
        self.logprobs.push(logprob);
    }

    /// Closes the row being gathered: it holds the entries pushed since the previous row.
    pub fn finish_row(&mut self) {
        self.spans.push(Some(self.row_start..self.ids.len()));
        self.row_start = self.ids.len();
    }

    /// Adds a `None` row.
    pub fn push_none_row(&mut self) {
        self.spans.push(None);
    }

    /// The kernel's view of the gathered rows.
    pub fn rows(&self) -> RaggedRows<'_> {
        RaggedRows {
            num_rows: self.num_rows,
            first_row: self.first_row,
            spans: &self.spans,
            ids: &self.ids,
            logprobs: &self.logprobs,
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
    pub(super) fn read_row(
        &self,
        datum: usize,
        row: usize,
        out: &mut RowBuffer,
    ) -> Result<(), KernelError> {
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
