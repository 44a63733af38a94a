# Sourced by the bench scripts: run_eval OUT NAME N FACTS [editserve eval args...]
# Runs one `editserve eval` unless OUT/NAME.json exists, writing it atomically; z* records
# that depend only on W0 are shared through .cache/records.
run_eval() {
    local out=$1 name=$2 n=$3 facts=$4; shift 4
    [ -s "$out/$name.json" ] && return
    .venv/bin/editserve eval --facts "$facts" --limit "$n" --json \
        --record-cache .cache/records "$@" > "$out/$name.json.tmp" 2> "$out/$name.log"
    mv "$out/$name.json.tmp" "$out/$name.json"
}
