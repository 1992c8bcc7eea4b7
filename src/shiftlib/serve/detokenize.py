"""Text from tokens as they are generated: incremental detokenization, then stop strings.

Decoding each new token alone is wrong twice over: byte-level BPE splits a multi-byte character over several
tokens (each alone decodes to U+FFFD), and SentencePiece tokenizers add or drop a leading space depending on
what comes before. So each step decodes a short window (a few tokens already emitted, then the new ones) and
emits only the text beyond what the window's first part decodes to; while the window's text ends in U+FFFD (a
character still unfinished) it emits nothing. At the end whatever is left is flushed as it decodes. The pieces
add up to what decoding all tokens at once gives.

Stop strings are searched in the text, so one split across tokens is caught; a tail of the text that could
still grow into a stop string is held back until it cannot, so a stream never shows part of a stop string.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens in the first window: they give the first new token its leading-space context


def decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives it; through the Rust
    tokenizer directly when that is the same (three times faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """The text of one request's new tokens, piece by piece."""

    def __init__(self, decode: Callable[[list[int]], str], prompt: list[int]) -> None:
        self.decode = decode
        self.tokens = list(prompt[-CONTEXT_TOKENS:])
        self.start = 0  # the window: tokens[start:] is decoded each step
        self.emitted = len(self.tokens)  # tokens whose text is out

    def add(self, tokens: list[int]) -> str:
        """The new text that ``tokens`` complete (maybe ``""``)."""
        self.tokens += tokens
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left at the end, unfinished characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.decode(self.tokens[self.start : self.emitted])
        text = self.decode(self.tokens[self.start :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.start, self.emitted = self.emitted, len(self.tokens)
        return text[len(before) :]


class StopStrings:
    """Cuts text before the first stop string to be complete, and holds back any tail that may still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held) that can be shown; sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        text, self.held = self.held + text, ""
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:  # the stop string that is complete first ends the text (the longer one if two end together)
            self.stopped = True
            return text[: min(hits)[1]]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held tail at the end of generation: it did not become a stop string."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that begins ``stop`` (and is shorter than it)."""
    return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)


class TextStream:
    """One choice's text: detokenized, then cut at stop strings (looked for once ``min_tokens`` are out, as
    vLLM does)."""

    def __init__(self, decode: Callable[[list[int]], str], prompt: list[int], stops: list[str],
                 min_tokens: int = 0) -> None:
        self.detokenizer = Detokenizer(decode, prompt)
        self.stops = StopStrings(stops)
        self.min_tokens, self.count = min_tokens, 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, tokens: list[int]) -> str:
        text = self.detokenizer.add(tokens)
        self.count += len(tokens)
        return self.stops.feed(text) if self.count >= self.min_tokens else text

    def finish(self) -> str:
        return self.stops.feed(self.detokenizer.flush()) + self.stops.flush()
