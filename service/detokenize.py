"""A row's output text, decoded incrementally, with its stop sequences.

Decoding all of a row's ids for every new token costs time quadratic in the output's length.
Instead each step decodes a short window: the ids not yet turned into text, after one or more
already decoded ids whose text is known. The difference between the window's text with and
without the new ids is what they add; the ids before it give tokenizers that drop a word's
leading space at the start of a text (SentencePiece) the context to keep it. A window whose text
ends in an unfinished character (U+FFFD) waits for the next id.
"""

from __future__ import annotations

from typing import Any

UNFINISHED = "\ufffd"  # what decode gives for the first bytes of a multi-byte character


class Detokenizer:
    """The text of one row's output ids (special tokens skipped), cut before the first stop
    sequence, and how much of it has been sent."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # the decoded text: complete characters only, until flushed
        self.stopped = False  # a stop sequence was found; ``text`` ends before it
        self._sent = 0  # characters of ``text`` already sent
        self._prefix = 0  # ids[_prefix:_read]: decoded already, the context of the next window
        self._read = 0  # ids[_read:]: not decoded into ``text`` yet

    def add(self, token: int, *, flush: bool = False) -> None:
        """Append ``token``'s text; with ``flush``, also an unfinished character's bytes (as
        U+FFFD): the output ends here."""
        self.ids.append(token)
        known = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(known) and (flush or not window.endswith(UNFINISHED)):
            self._extend(window[len(known) :])
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> None:
        """Append what the ids not decoded yet give, unfinished character and all."""
        if self._read < len(self.ids):
            known = self._decode(self.ids[self._prefix : self._read])
            self._extend(self._decode(self.ids[self._prefix :])[len(known) :])
            self._prefix = self._read = len(self.ids)

    def sendable(self) -> str:
        """The text not sent yet, less any tail that a stop sequence may begin with; it counts
        as sent."""
        end = len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece

    def rest(self) -> str:
        """All the text not sent yet (the output is over); it counts as sent."""
        piece = self.text[self._sent :]
        self._sent = len(self.text)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""

    def _extend(self, piece: str) -> None:
        if self.stopped:
            return
        # A stop sequence not in the text before must end in the new piece.
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        hits = [at for at in (self.text.find(s, start) for s in self.stops) if at >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` are the start of a stop sequence (the
    longest such tail)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
