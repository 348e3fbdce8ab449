#!/usr/bin/env bash
# The continual-learning experiment on the embedded SmolLM2-135M-Instruct (offline, CPU or GPU):
# stage 1 capitals facts, stage 2 a tool-call syntax; SFT and SDFT at three learning rates, three
# seeds each; writes examples/continual/outputs/continual/{results.jsonl,results.md,tradeoff.png,
# stages.png}. Run it again to resume after an interruption. Extra arguments go to
# `sdft continual` (e.g. --parallel 2). QUICK=1 runs the reduced version (one seed, two lrs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SDFT_VENV:-$HOME/.venvs/sdft}"
if [[ ! -x "$VENV/bin/sdft" ]]; then
  bash "$ROOT/scripts/setup.sh"
fi
EXPERIMENT="$ROOT/examples/continual/experiment.yaml"
if [[ "${QUICK:-0}" == "1" ]]; then
  EXPERIMENT="$ROOT/examples/continual/experiment_quick.yaml"
fi
"$VENV/bin/sdft" validate "$EXPERIMENT"
start=$(date +%s)
"$VENV/bin/sdft" continual "$EXPERIMENT" "$@"
echo "experiment: $(( $(date +%s) - start )) s"
