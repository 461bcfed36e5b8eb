"""Incremental detokenisation: print text as tokens arrive without splitting multi-byte characters."""

from __future__ import annotations

from typing import Callable

__all__ = ["TextStream"]


class TextStream:
    """Feeds token ids, returns the new printable text each time (held back while a UTF-8 char is incomplete)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._printed = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):  # a byte-level token ended mid-character: wait for the rest
            return ""
        new, self._printed = text[self._printed:], len(text)
        return new

    def flush(self) -> str:
        text = self._decode(self._ids)
        new, self._printed = text[self._printed:], len(text)
        return new
