"""What the command lines (``python -m export``, ``engines``, ``validate``) share: messages printed as plain text
(a path or a hint such as ``pip install '.[cuda]'`` is never read as Rich markup), and SIGTERM / SIGHUP handled
like Ctrl-C, so every clean-up that runs on an interrupt also runs on ``kill``, ``docker stop`` or a closed
terminal."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.text import Text

__all__ = ["Terminated", "first_line", "print_error", "print_plain", "interrupt_exit_code", "termination_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_exit_code(error: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + getattr(error, "signum", signal.SIGINT)


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def print_plain(console: Console, message: str, style: str | None = None) -> None:
    console.print(Text(message, style=style or ""), soft_wrap=True)


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` with the message as literal text."""
    console.print(Text("error: ", style="red") + Text(message), soft_wrap=True)


def first_line(error: BaseException) -> str:
    """The first line of a library's (often long) error message, or its type when it has none: for one-line
    errors that quote the cause."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
