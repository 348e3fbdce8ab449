#!/usr/bin/env bash
# The continual-learning experiment on the embedded SmolLM2-135M-Instruct (offline, CPU or GPU):
# stage 1 capitals facts, stage 2 a tool-call syntax; SFT and SDFT at three learning rates, three
# seeds each; writes examples/continual/outputs/continual/{results.jsonl,results.md,tradeoff.png,
# stages.png}. Run it again to resume after an interruption. Extra arguments go to
# `sdft continual` (e.g. --parallel 2). QUICK=1 runs the reduced version (one seed, two lrs).
# JOBS=N runs N `sdft continual` processes that share the chains (sdft.continual.claims), each with
# nproc/N torch threads (on a GPU machine, run one `sdft continual` per GPU instead).
set -euo pipefail
JOBS="${JOBS:-1}"
if [[ ! "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
  echo "experiment: JOBS must be a positive integer, got '$JOBS'" >&2
  exit 2
fi
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
if (( JOBS == 1 )); then
  "$VENV/bin/sdft" continual "$EXPERIMENT" "$@"
else
  threads=$(( $(nproc) / JOBS ))
  (( threads >= 1 )) || threads=1
  pids=()
  for _ in $(seq "$JOBS"); do
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$VENV/bin/sdft" continual "$EXPERIMENT" "$@" &
    pids+=("$!")
  done
  status=0
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  "$VENV/bin/sdft" continual "$EXPERIMENT" --report-only
  (( status == 0 )) || exit "$status"
fi
echo "experiment: $(( $(date +%s) - start )) s"
