#!/usr/bin/env bash
# The README's main command: sets everything up (scripts/setup.sh), then runs the capitals
# walkthrough offline on the embedded SmolLM2-135M-Instruct: validation, the SDFT run, the SFT
# baseline on the same data, and a side-by-side comparison. Prints where every output is.
# Re-running starts both runs over (--overwrite). Extra arguments go to both `sdft train` calls
# (e.g. --max-steps 4 for a quick look). Only sdft's own lines are printed; SDFT_DEBUG=1 shows the
# libraries' progress bars, warnings and logs too.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDFT_VENV:-$HOME/.venvs/sdft}"
example="$repo/examples/capitals"

bash "$repo/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sdft="$venv/bin/sdft"
started=$SECONDS

echo
echo "== 1/4 validate the configs (offline checks) =="
"$sdft" validate "$example/config.yaml" --deep
"$sdft" validate "$example/config_sft.yaml"

echo
echo "== 2/4 SDFT: the student learns from itself shown the answer =="
"$sdft" train "$example/config.yaml" --overwrite "$@"

echo
echo "== 3/4 SFT baseline: cross-entropy on the golden answers, same data =="
"$sdft" train "$example/config_sft.yaml" --overwrite "$@"

echo
echo "== 4/4 compare =="
"$sdft" compare "$example/outputs/sdft" "$example/outputs/sft" --labels SDFT SFT \
    --output "$example/outputs"

echo
echo "Walkthrough finished in $((SECONDS - started)) s (after setup)."
echo "SDFT run:    $example/outputs/sdft   (summary.md, metrics.jsonl, plot.png, predictions/)"
echo "SFT run:     $example/outputs/sft"
echo "Comparison:  $example/outputs/comparison.md, $example/outputs/comparison.png"
