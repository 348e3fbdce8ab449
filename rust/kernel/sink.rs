//! Where written rows go: the dense `(N, topk)` blocks or the CSR parts of one datum.

use super::KernelError;

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

/// Where a written row goes.
pub(super) trait RowSink {
    /// Writes `ids` and the weights `(exps * inverse_total) * scale` (as f32) left-aligned into
    /// output row `row`; rows arrive in strictly increasing order.
    fn write_row(
        &mut self,
        row: usize,
        ids: &[i64],
        exps: &[f64],
        inverse_total: f64,
        scale: f64,
    ) -> Result<(), KernelError>;
}

pub(super) struct DenseSink<'o> {
    pub(super) topk: usize,
    pub(super) target_tokens: &'o mut [i64],
    pub(super) weights: &'o mut [f32],
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
    ) -> Result<(), KernelError> {
        let start = row * self.topk;
        let end = start + ids.len();
        let (Some(tokens_out), Some(weights_out)) = (
            self.target_tokens.get_mut(start..end),
            self.weights.get_mut(start..end),
        ) else {
            return Err(KernelError::internal(format!(
                "output row {row} is out of range"
            )));
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

pub(super) struct CsrSink {
    pub(super) crow: Vec<i64>,
    pub(super) col: Vec<i64>,
    pub(super) target_tokens: Vec<i64>,
    pub(super) weights: Vec<f32>,
}

impl CsrSink {
    /// Extends the row pointers so that every row before `row` is closed (empty when not written).
    pub(super) fn close_rows_until(&mut self, row: usize) {
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
    ) -> Result<(), KernelError> {
        if self.crow.len() > row + 1 {
            return Err(KernelError::internal(format!(
                "output row {row} written twice"
            )));
        }
        self.close_rows_until(row);
        self.col.extend(0..ids.len() as i64);
        self.target_tokens.extend_from_slice(ids);
        self.weights
            .extend(exps.iter().map(|&e| ((e * inverse_total) * scale) as f32));
        Ok(())
    }
}
