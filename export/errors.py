"""The export's error type, kept free of torch so the command line can raise and catch it before torch loads."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says why and what to do."""
