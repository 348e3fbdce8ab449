"""sdft: Self-Distillation Fine-Tuning with a Rust top-K kernel."""

__version__ = "0.1.0"
