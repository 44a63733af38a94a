#!/usr/bin/env bash
# Hyper-parameter sweep for the default model (docs/hyperparameters.md).
# Sequential single edits of the first N CounterFact facts with d4s + RECT 0.4, one run per
# setting. z* records depend only on W0, so settings that share a layer range reuse them.
# Usage: bench/sweep.sh [N] [FACTS]   (about 5 min per layer range + 1.5 min per setting)
set -euo pipefail
N=${1:-50}
FACTS=${2:-../shared/data/counterfact/counterfact-train.json}
OUT=bench/results/sweep
mkdir -p "$OUT"
source "$(dirname "$0")/run_eval.sh"
run() { run_eval "$OUT" "$1" "$N" "$FACTS" "${@:2}"; }
for lam in 3000 1500 6000 10000 800; do run "layers3-7_lambda$lam" --layers 3-7 --lambda "$lam"; done
for layers in 2-6 4-8 5-9; do run "layers${layers}_lambda2000" --layers "$layers" --lambda 2000; done
