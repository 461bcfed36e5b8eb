"""The text of one generated choice as it streams: incomplete UTF-8 held back, stop strings cut and never
half-sent. The deltas joined equal the final text, so a stream and a non-stream answer carry the same characters."""

from __future__ import annotations

from typing import Callable, Sequence

from ..streaming import TextStream

__all__ = ["ChoiceText"]


class ChoiceText:
    """Feed generated tokens; each call returns the text that may be sent now.

    While stop strings are set, the last ``len(longest stop) - 1`` characters are held back (they could be the start
    of a stop string). When a stop string appears, the text is cut before it and :attr:`stopped` becomes True.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty.")
        self._stream = TextStream(decode)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""  # decoded so far (cut at a stop string once one is found)
        self._sent = 0  # characters of _text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """The choice's text so far (without any stop string)."""
        return self._text

    def push(self, token: int) -> str:
        """Add one generated token; the text that can be sent now (possibly empty)."""
        if self.stopped:
            raise RuntimeError("the choice already ended at a stop string.")
        self._text += self._stream.push(token)
        return self._release(final=self._cut())

    def finish(self) -> str:
        """End of generation (EOS or length): flush an incomplete character and everything held back."""
        if not self.stopped:
            self._text += self._stream.flush()
            self._cut()
        return self._release(final=True)

    def _cut(self) -> bool:
        """Cut the text at the earliest stop string; True when one was found."""
        if not self._stop:
            return False
        start = max(0, self._sent - self._hold)  # anything earlier was checked before
        found = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if not found:
            return False
        self._text = self._text[: min(found)]
        self.stopped = True
        return True

    def _release(self, final: bool) -> str:
        end = len(self._text) if final else max(self._sent, len(self._text) - self._hold)
        piece, self._sent = self._text[self._sent:end], end
        return piece
