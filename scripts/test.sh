#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), runs the gates (formatting, lints, type checks, the stub
# check of the extension), then the whole test suite: Rust unit tests of the pure kernel, then
# pytest (kernel equivalence, backend contract, training system end to end); with
# SDFT_CHECK_MIN_VERSIONS=1 also the fast tests on every dependency's lowest declared version.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDFT_VENV:-$HOME/.venvs/sdft}"
bash "$repo/scripts/setup.sh"
cd "$repo"
echo "test: gates"
cargo fmt --check
cargo clippy --quiet --all-targets --no-default-features -- -D warnings
cargo clippy --quiet --all-targets -- -D warnings
"$venv/bin/ruff" check python tests benches
"$venv/bin/ruff" format --check python tests benches
"$venv/bin/mypy"
"$venv/bin/python" -m mypy.stubtest sdft._kernel --concise
echo "test: cargo test"
cargo test --release --no-default-features --quiet
echo "test: pytest"
"$venv/bin/python" -m pytest -q "$@"
# The declared lower bounds (a second multi-GB torch, so opt-in): SDFT_CHECK_MIN_VERSIONS=1.
if [ "${SDFT_CHECK_MIN_VERSIONS:-0}" = 1 ]; then
    echo "test: minimum versions"
    bash "$repo/scripts/check_min_versions.sh"
fi
