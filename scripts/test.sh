#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: Rust unit tests of the pure
# kernel, then pytest (kernel equivalence, backend contract, training system end to end).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDFT_VENV:-$HOME/.venvs/sdft}"
bash "$repo/scripts/setup.sh"
cd "$repo"
cargo test --release --no-default-features --quiet
"$venv/bin/ruff" check python tests benches
"$venv/bin/python" -m pytest -q "$@"
