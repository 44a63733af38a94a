#!/usr/bin/env bash
# The sequential-editing study: every method (the keyed memory, the default, and the weight
# methods), N sequential single edits of the first N CounterFact facts, evaluated at N = 10, 100,
# 500 and the last N; then zsRE's token accuracies.
# One run per method gives every N (edits are applied in order, so the state after the first
# 100 edits of a 1,000-edit run is the state of a 100-edit run).
#
# Usage: bench/study.sh [N] [OUT]            bench/study.sh 1000   (the full study)
# Expected time on a 2-core Xeon: N=1000 about 6-7 h, CounterFact and zsRE (memit-seq and
# alphaedit recompute z* on the live weights, 3-4 s per edit; the d4s runs share W0-only z*
# records, computed once, 16 facts per batched optimisation, 1-2 s per fact).
# Environment: COUNTERFACT, ZSRE (dataset paths), METHODS (a subset of the run names below),
# ZSRE_N (0 skips zsRE), CHECKPOINTS (the N evaluated before the last, comma-separated; by
# default those of 10, 100 and 500 below N; empty for the last N alone).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
OUT=${2:-bench/results/study-$N}
DATA=../shared/data
COUNTERFACT=${COUNTERFACT:-$DATA/counterfact/counterfact-train.json}
ZSRE=${ZSRE:-$DATA/zsre/zsre-train-1k.json}
ZSRE_N=${ZSRE_N:-$N}
METHODS=${METHODS:-"memory d4s-rect0.4 d4s-rect0.2 d4s-rect0.6 d4s memit-seq alphaedit"}
for file in "$COUNTERFACT" "$ZSRE"; do
    [ -f "$file" ] || { echo "no dataset at $file: set COUNTERFACT / ZSRE" >&2; exit 2; }
done
mkdir -p "$OUT"
checkpoints=${CHECKPOINTS-$(for n in 10 100 500; do if [ "$n" -lt "$N" ]; then printf '%s,' "$n"; fi; done)}

args_for() {
    case $1 in
        d4s) echo "--method d4s --rect-keep 1.0" ;;
        d4s-rect*) echo "--method d4s --rect-keep ${1#d4s-rect}" ;;
        *) echo "--method $1" ;;
    esac
}

# complete OUT FACTS LIMIT: whether the result file OUT holds every fact of the first LIMIT
# (counted as load_facts counts them: zsRE's 1,000 records give 998 edits, two have no target)
complete() {
    [ -s "$1" ] && .venv/bin/python - "$@" <<'EOF'
import json, sys
from editing.facts import load_facts
out, facts, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.exit(json.load(open(out))["n_edits"] != len(load_facts(facts, limit)))
EOF
}

# run NAME FACTS LIMIT: one eval, skipped when its result is already complete
run() {
    local name=$1 facts=$2 limit=$3
    if complete "$OUT/$name.json" "$facts" "$limit" 2> /dev/null; then
        return
    fi
    echo "== $name ($limit edits)" >&2
    # shellcheck disable=SC2046
    .venv/bin/editserve eval --facts "$facts" --limit "$limit" --checkpoints "$checkpoints" \
        --record-cache .cache/records --zstar-batch 16 --out "$OUT/$name.json" \
        $(args_for "${name#zsre-}") > /dev/null 2> "$OUT/$name.log"
}

for method in $METHODS; do run "$method" "$COUNTERFACT" "$N"; done
if [ "$ZSRE_N" -gt 0 ]; then
    for method in $METHODS; do run "zsre-$method" "$ZSRE" "$ZSRE_N"; done
fi
.venv/bin/python bench/report.py "$OUT"
