//! sdft's Rust core. `kernel` is pure Rust (no PyO3 types); `python` is the one thin binding.
pub mod buffer;
pub mod fast_exp;
pub mod kernel;

#[cfg(feature = "python")]
mod python;
