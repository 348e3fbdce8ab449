//! sdft's Rust core. `kernel` and `buffer` are pure Rust (no PyO3 types) and fail with the one
//! `error::KernelError`; `python` is the one thin binding, which maps that error to Python.
pub mod buffer;
pub mod error;
pub mod fast_exp;
pub mod kernel;

#[cfg(feature = "python")]
mod python;
