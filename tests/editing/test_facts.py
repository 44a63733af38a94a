import pytest

from editing.facts import Fact, InvalidFactError, continuation, subject_last_token, validate_fact
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
