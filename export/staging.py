"""Atomic output folders: everything is written into a hidden sibling folder, then renamed into place.

An interrupted or failed export leaves nothing behind, and an existing folder is replaced only after the new one
is complete (and only when the caller allows it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["OutputExistsError", "OutputNotWritableError", "staged_directory", "check_writable"]


class OutputExistsError(FileExistsError):
    pass


class OutputNotWritableError(PermissionError):
    pass


def check_writable(target: Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``target`` cannot be written."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder. Choose another --out.")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists. Pass --force to replace it, or choose another --out.")
    parent = target.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write to {parent}: {existing} is not a writable folder.")


@contextmanager
def staged_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on success rename it to ``target``.

    On any exception (KeyboardInterrupt included) the staging folder is deleted and ``target`` is untouched.
    With ``overwrite`` an existing ``target`` is swapped out only once the new folder is complete.
    """
    target = Path(target).absolute()
    check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            if not overwrite:  # appeared while we worked
                raise OutputExistsError(f"{target} appeared during the export; nothing was replaced.")
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
