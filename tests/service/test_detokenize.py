"""Incremental detokenization with the real tokenizer: the pieces sent add up to the whole
decode, a multi-byte character is sent once complete, each token costs a bounded decode, and
stop sequences cut the text and are never sent."""

from __future__ import annotations

from typing import Any

import pytest

from editing.models import LoadedModel
from service.detokenize import UNFINISHED, Detokenizer

TEXT = "Grüße aus Köln, 世界 🙂! The river runs on, and on, past the old mill."


def stream(tokenizer: Any, ids: list[int], stops: tuple[str, ...] = ()) -> list[str]:
    """The pieces a row sends for ``ids``: one per token, then the rest at the end."""
    out = Detokenizer(tokenizer, stops)
    pieces = []
    for i, token in enumerate(ids):
        out.add(token, flush=i == len(ids) - 1)
        pieces.append(out.sendable())
        if out.stopped:
            break
    return [*pieces, out.rest()]


def test_pieces_add_up_to_the_whole_decode(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = tok(TEXT)["input_ids"]
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert not any(UNFINISHED in p for p in pieces)  # a character's bytes wait for each other
    # Each token's text is sent with that token unless it only begins a character.
    whole = [p for p, i in zip(pieces, ids, strict=False) if UNFINISHED not in tok.decode([i])]
    assert all(whole)


def test_an_unfinished_character_is_flushed_at_the_end(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = tok(TEXT)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith(UNFINISHED))
    assert "".join(stream(tok, ids[:cut])) == tok.decode(ids[:cut], skip_special_tokens=True)


def test_decoding_work_per_token_is_bounded(lm: LoadedModel, monkeypatch: Any) -> None:
    tok = lm.tokenizer
    ids = tok(TEXT * 8)["input_ids"]
    lengths: list[int] = []
    decode = tok.decode

    def counted(token_ids: list[int], *args: Any, **kwargs: Any) -> str:
        lengths.append(len(token_ids))
        return str(decode(token_ids, *args, **kwargs))

    monkeypatch.setattr(tok, "decode", counted)
    stream(tok, ids)
    assert len(lengths) <= 2 * len(ids) and max(lengths) <= 8


@pytest.mark.parametrize("stops", [("Köln",), ("on, past", "river"), ("世界",), ("🙂",)])
def test_stop_sequences_cut_the_text_and_are_never_sent(
    lm: LoadedModel, stops: tuple[str, ...]
) -> None:
    tok = lm.tokenizer
    ids = tok(TEXT)["input_ids"]
    pieces = stream(tok, ids, stops)
    first = min(TEXT.index(s) for s in stops)
    assert "".join(pieces) == TEXT[:first]
