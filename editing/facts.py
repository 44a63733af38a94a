"""Facts to edit, how they are checked, and how editing datasets are read."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class EditError(Exception):
    """An edit could not be made; the editor's state and the weights are as they were."""


class InvalidFactError(EditError, ValueError):
    """A fact is malformed: the message names the field and what is wrong with it."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class NonFiniteUpdateError(EditError, ArithmeticError):
    """The computed update holds NaN or infinity; nothing was changed."""


@dataclass(frozen=True)
class Locality:
    """A prompt whose answer the edit must leave alone (``answer`` may be unknown)."""

    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class Fact:
    """One edit request: after ``prompt`` (which contains ``subject``), say ``target_new``."""

    subject: str
    prompt: str
    target_new: str
    ground_truth: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[Locality, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        """Two facts with the same key edit the same thing: the later supersedes the earlier."""
        return (self.subject, self.prompt)

    def target_text(self, answer: str) -> str:
        """``answer`` as it continues this fact's prompt."""
        return continuation(self.prompt, answer)


def continuation(prompt: str, answer: str) -> str:
    """``answer`` as it continues ``prompt``: with a leading space unless one is there.

    Tokenisers fold the space into the word (" piano" is one token, "piano" two).
    """
    if prompt.endswith((" ", "\n")) or answer.startswith((" ", "\n")):
        return answer
    return " " + answer


def validate_fact(fact: Fact, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> None:
    """Raise :class:`InvalidFactError` when ``fact`` cannot be edited by this model."""
    if not fact.subject.strip():
        raise InvalidFactError("subject", "is empty")
    if not fact.prompt.strip():
        raise InvalidFactError("prompt", "is empty")
    if fact.subject not in fact.prompt:
        raise InvalidFactError(
            "subject", f"{fact.subject!r} does not occur in the prompt {fact.prompt!r}"
        )
    if not fact.target_new.strip():
        raise InvalidFactError("target_new", "is empty")
    prompt_tokens = len(tokenizer(fact.prompt)["input_ids"])
    target_tokens = len(tokenizer(fact.target_text(fact.target_new))["input_ids"])
    # The longest input built from a fact is a context prefix + prompt + target.
    if prompt_tokens + target_tokens + 16 > max_tokens:
        raise InvalidFactError(
            "prompt",
            f"{prompt_tokens} prompt tokens + {target_tokens} target tokens exceed the "
            f"model's context of {max_tokens} tokens",
        )
    for i, text in enumerate(fact.paraphrases):
        if not text.strip():
            raise InvalidFactError(f"paraphrases[{i}]", "is empty")


def subject_last_token(
    tokenizer: PreTrainedTokenizerBase, text: str, subject: str, search_from: int = 0
) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the last token of the first ``subject`` at or
    after character ``search_from``."""
    start = text.index(subject, search_from)
    end = start + len(subject)
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    last = max(i for i, (a, b) in enumerate(offsets) if a < end and b > a)
    return ids, last


def _editable(records: list[dict[str, Any]], target: str, path: str | Path) -> list[dict]:
    """The records that ask for an edit: those whose new answer (field ``target``) is blank
    cannot be edited, and are left out with a warning naming their indices (zsRE's 1,000
    training records hold two, 534 and 723, whose ``alt`` is empty)."""
    skipped = [i for i, r in enumerate(records) if not str(r.get(target) or "").strip()]
    if skipped:
        log.warning("%s: %d records with no %s left out: %s", path, len(skipped), target, skipped)
    left_out = set(skipped)
    return [r for i, r in enumerate(records) if i not in left_out]


def load_counterfact(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Read a CounterFact file in EasyEdit's format (a JSON list of records): the first
    ``limit`` records that ask for an edit (see :func:`_editable`)."""
    records = _editable(json.loads(Path(path).read_text()), "target_new", path)
    facts = []
    for record in records[:limit]:
        locality: tuple[Locality, ...] = ()
        if record.get("locality_prompt"):
            locality = (Locality(record["locality_prompt"], record.get("locality_ground_truth")),)
        paraphrase = record.get("rephrase_prompt")
        facts.append(
            Fact(
                subject=record["subject"],
                prompt=record["prompt"],
                target_new=record["target_new"],
                ground_truth=record.get("ground_truth"),
                paraphrases=(paraphrase,) if paraphrase else (),
                locality=locality,
                metadata={"case_id": record.get("case_id")},
            )
        )
    return facts


def load_zsre(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Read a zsRE file in EasyEdit's format, question ``src``, new answer ``alt``: the first
    ``limit`` records that ask for an edit (see :func:`_editable`)."""
    records = _editable(json.loads(Path(path).read_text()), "alt", path)
    facts = []
    for record in records[:limit]:
        facts.append(
            Fact(
                subject=record["subject"],
                prompt=record["src"],
                target_new=record["alt"],
                ground_truth=(record.get("answers") or [None])[0],
                paraphrases=(record["rephrase"],) if record.get("rephrase") else (),
                locality=(Locality(record["loc"], record.get("loc_ans")),),
            )
        )
    return facts


def load_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Read CounterFact or zsRE (EasyEdit formats), telling them apart by their fields."""
    records = json.loads(Path(path).read_text())
    if records and "src" in records[0]:
        return load_zsre(path, limit)
    return load_counterfact(path, limit)
