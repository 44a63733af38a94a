"""Markdown table of ``editserve eval --json`` results: python bench/table.py FILE.json ..."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("run", None),
    ("method", "method"),
    ("layers", "layers"),
    ("lambda", "mom2_lambda"),
    ("RECT", "rect_keep"),
    ("N", "n_edits"),
    ("efficacy", "efficacy"),
    ("paraphrase", "paraphrase"),
    ("neighbourhood", "neighborhood"),
    ("neigh. before", "neighborhood_before"),
    ("Score", "score"),
    ("ppl before", "perplexity_before"),
    ("ppl after", "perplexity_after"),
    ("fluency after", "fluency_after"),
    ("mean abs dW (last layer)", None),
    ("s/edit (median)", "seconds_per_edit"),
]


def _cell(result: dict, name: str, key: str | None, path: Path) -> str:
    if name == "run":
        return path.stem
    if name == "layers":
        layers = result["layers"]
        return f"{layers[0]}-{layers[-1]}"
    if name == "RECT" and result["method"] != "d4s":
        return "-"  # RECT is applied by d4s only
    if key is None:
        deltas = result["l1_delta_by_layer"]
        return f"{deltas[max(deltas, key=int)]:.2e}"
    value = result.get(key)
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for path in paths:
        result = json.loads(path.read_text())
        print("| " + " | ".join(_cell(result, n, k, path) for n, k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
