//! One teacher row's arithmetic: the entries taken from the row, their validation and vocabulary
//! filter, and the renormalization (a log-sum-exp in `f64`) with the row's entropy terms.

use super::MAX_TOKEN_ID;
use crate::fast_exp;

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

/// The entries of the row being processed (the first `len` of each vector, at most `topk`) and
/// scratch space for their renormalization. Allocated once per batch (per worker thread).
#[derive(Debug)]
pub(super) struct RowBuffer {
    pub(super) ids: Vec<i64>,
    pub(super) logprobs: Vec<f64>,
    pub(super) exps: Vec<f64>,
    pub(super) len: usize,
}

impl RowBuffer {
    pub(super) fn new(topk: usize) -> Self {
        RowBuffer {
            ids: vec![0; topk],
            logprobs: vec![0.0; topk],
            exps: vec![0.0; topk],
            len: 0,
        }
    }

    /// Takes entries from `cells` until it has `topk` of them (the top-K cut).
    #[inline(always)]
    pub(super) fn load(&mut self, cells: impl Iterator<Item = (i64, f64)>) {
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
    pub(super) fn load_slices<I: TokenCell, F: LogprobCell>(
        &mut self,
        ids: &[I],
        logprobs: &[F],
        end: usize,
    ) {
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

    pub(super) fn ids(&self) -> &[i64] {
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

/// Checks every taken entry, then keeps (in order) the ones below `vocab_size`. Returns how many
/// were kept and their largest log-prob, or the first bad entry.
#[inline(always)]
pub(super) fn validate_and_filter(
    buffer: &mut RowBuffer,
    vocab_size: Option<i64>,
) -> Result<(usize, f64), BadEntry> {
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

/// The first invalid entry of a row: its index among the taken entries and what is wrong with it
/// (the caller adds where the row is).
#[derive(Debug)]
pub(super) struct BadEntry {
    pub(super) entry: usize,
    pub(super) problem: String,
}

#[cold]
fn first_bad_entry(ids: &[i64], logprobs: &[f64]) -> BadEntry {
    for (entry, (&id, &logprob)) in ids.iter().zip(logprobs).enumerate() {
        if !(0..=MAX_TOKEN_ID).contains(&id) {
            let problem = format!("token id {id} is outside [0, {MAX_TOKEN_ID}]");
            return BadEntry { entry, problem };
        }
        if !logprob.is_finite() {
            let problem = format!("logprob is {logprob}; teacher logprobs must be finite");
            return BadEntry { entry, problem };
        }
    }
    BadEntry {
        entry: 0,
        problem: "invalid entry (internal error)".to_string(),
    }
}

/// The renormalization of one row: `p = e / total = exp(lp - logsumexp(lp))` with
/// `e = exp(lp - max)`; its entropy is `-sum p log p = ln(total) - expected_shift`.
pub(super) struct Renormalized {
    pub(super) total: f64,
    pub(super) inverse_total: f64,
    /// `sum p (lp - max)` (non-positive).
    pub(super) expected_shift: f64,
}

/// Renormalizes the buffer's (finite, non-empty) log-probs, whose maximum is `max`, in `f64`,
/// leaving `e = exp(lp - max)` in `buffer.exps`.
#[inline(always)]
pub(super) fn renormalize(buffer: &mut RowBuffer, max: f64) -> Renormalized {
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
pub(super) struct LogProduct {
    mantissa: f64,
    exponent: i64,
}

impl LogProduct {
    pub(super) fn new() -> Self {
        LogProduct {
            mantissa: 1.0,
            exponent: 0,
        }
    }

    /// Multiplies by a finite `factor >= 1` (a row total: the max entry contributes `exp(0)`).
    #[inline(always)]
    pub(super) fn multiply(&mut self, factor: f64) {
        let bits = (self.mantissa * factor).to_bits();
        self.exponent += ((bits >> 52) & 0x7ff) as i64 - 1023;
        self.mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    }

    pub(super) fn ln(&self) -> f64 {
        self.mantissa.ln() + self.exponent as f64 * std::f64::consts::LN_2
    }
}
