#!/usr/bin/env bash
# The four methods at N sequential single edits of CounterFact, with the default
# hyper-parameters: d4s (RECT 0.4), d4s without RECT, memit-seq, alphaedit.
# Usage: bench/compare.sh [N] [FACTS]   (N=100: about 35 min on a 2-core CPU)
set -euo pipefail
N=${1:-100}
FACTS=${2:-../shared/data/counterfact/counterfact-train.json}
OUT=bench/results/compare-$N
mkdir -p "$OUT"
source "$(dirname "$0")/run_eval.sh"
run() { run_eval "$OUT" "$1" "$N" "$FACTS" "${@:2}"; }
run d4s-rect0.4 --method d4s --rect-keep 0.4
run d4s-norect --method d4s --rect-keep 1.0
run memit-seq --method memit-seq
run alphaedit --method alphaedit
python3 bench/table.py "$OUT"/*.json > "$OUT/table.md"
