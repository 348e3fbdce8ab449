//! Pure top-K kernel (being written).
pub const KERNEL_VERSION: &str = env!("CARGO_PKG_VERSION");
