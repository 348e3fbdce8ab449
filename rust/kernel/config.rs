//! Batch-wide settings, validated once per batch.

use super::{KernelError, MAX_TOPK, MAX_WEIGHT_SCALE};

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
        // Finite as f64 is not enough: the weights are f32, and a scale above the largest f32
        // turns probability-1 entries into `inf`.
        if weight_scale > MAX_WEIGHT_SCALE {
            return Err(KernelError::Argument(format!(
                "weight_scale must be at most {MAX_WEIGHT_SCALE:e} (the largest float32: weights \
                 are float32), got {weight_scale:e}"
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
