//! sdft's Rust core. `kernel` is pure Rust (no PyO3 types); `python` is the one thin binding.
pub mod kernel;

#[cfg(feature = "python")]
mod python;
