import json
from pathlib import Path

import pytest

from editing.facts import (
    Fact,
    InvalidFactError,
    continuation,
    load_facts,
    subject_last_token,
    validate_fact,
)
from editing.models import LoadedModel


def test_continuation_adds_a_space_only_where_needed() -> None:
    assert continuation("Toko Yasuda, the", "piano") == " piano"
    assert continuation("Answer: ", "piano") == "piano"
    assert continuation("Answer:", " piano") == " piano"


def test_subject_last_token_points_at_the_subject(lm: LoadedModel) -> None:
    text = "Notes: The mother tongue of Pablo Picasso is"
    ids, last = subject_last_token(lm.tokenizer, text, "Pablo Picasso", len("Notes: "))
    upto = lm.tokenizer.decode(ids[: last + 1])
    assert upto.endswith("Picasso")


@pytest.mark.parametrize(
    ("fact", "field"),
    [
        (Fact("Paris", "The capital of France is", " Rome"), "subject"),
        (Fact("France", "The capital of France is", "  "), "target_new"),
        (Fact("", "The capital of France is", "Rome"), "subject"),
        (Fact("France", "The capital of France is", "Rome", paraphrases=("",)), "paraphrases[0]"),
    ],
)
def test_invalid_facts_name_the_field(lm: LoadedModel, fact: Fact, field: str) -> None:
    with pytest.raises(InvalidFactError) as info:
        validate_fact(fact, lm.tokenizer, max_tokens=8192)
    assert info.value.field == field


def test_prompt_longer_than_context_is_rejected(lm: LoadedModel) -> None:
    fact = Fact("France", "word " * 9000 + "The capital of France is", "Rome")
    with pytest.raises(InvalidFactError, match="context"):
        validate_fact(fact, lm.tokenizer, max_tokens=8192)


def _zsre(subject: str, alt: str) -> dict:
    return {
        "subject": subject,
        "src": f"What is {subject} known for?",
        "alt": alt,
        "answers": ["x"],
        "rephrase": f"{subject} is known for what?",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
    }


@pytest.mark.parametrize("dataset", ["zsre", "counterfact"])
def test_records_with_no_new_answer_are_left_out_and_the_limit_counts_the_rest(
    tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    answers = ["music", "", "painting", "   ", "poetry"]
    records = [_zsre(f"Person {i}", a) for i, a in enumerate(answers)]
    if dataset == "counterfact":
        records = [
            {"subject": r["subject"], "prompt": r["src"], "target_new": r["alt"]} for r in records
        ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    facts = load_facts(path, limit=3)
    assert [f.subject for f in facts] == ["Person 0", "Person 2", "Person 4"]
    assert [f.target_new for f in facts] == ["music", "painting", "poetry"]
    assert "[1, 3]" in caplog.text
