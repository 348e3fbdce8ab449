//! The one error type of the pure core (`kernel`, `buffer`). It carries no PyO3 types; the binding
//! turns it into a Python exception in one place (`impl From<KernelError> for PyErr`).

use std::fmt;

/// Why a batch was rejected. Every message names the datum and, for per-value problems, the
/// completion position, the student position, the teacher row and the entry.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// A batch-wide argument is out of range (`topk`, `vocab_size`, `skip_first_n`, `weight_scale`).
    Argument(String),
    /// One datum's input is malformed.
    Datum { datum: usize, message: String },
    /// The output cannot exist: it is larger than the address space or the machine's memory, or
    /// the allocator refused it.
    OutOfMemory(String),
    /// A broken invariant of this crate: a bug, never a consequence of the caller's input.
    Internal(String),
}

impl KernelError {
    pub fn datum(datum: usize, message: impl Into<String>) -> Self {
        KernelError::Datum {
            datum,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        KernelError::Internal(message.into())
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Argument(message) | KernelError::OutOfMemory(message) => {
                f.write_str(message)
            }
            KernelError::Datum { datum, message } => write!(f, "datum {datum}: {message}"),
            KernelError::Internal(message) => write!(f, "{message} (internal error)"),
        }
    }
}

impl std::error::Error for KernelError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            KernelError::Argument("topk must be between 1 and 4096, got 0".into()).to_string(),
            "topk must be between 1 and 4096, got 0"
        );
        assert_eq!(
            KernelError::datum(3, "mask[1] is NaN; mask values must be finite").to_string(),
            "datum 3: mask[1] is NaN; mask values must be finite"
        );
        assert_eq!(
            KernelError::OutOfMemory("output needs 9.0 GiB".into()).to_string(),
            "output needs 9.0 GiB"
        );
        assert_eq!(
            KernelError::internal("output row 4 written twice").to_string(),
            "output row 4 written twice (internal error)"
        );
    }
}
