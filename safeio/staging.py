"""Safe output folders: everything is written into a hidden sibling folder, then swapped into place atomically.

Guarantees, whatever happens to the process (an exception, SIGINT/SIGTERM/SIGHUP, SIGKILL, power loss):

- the target holds either its old content or the new complete folder, never a mix and never nothing;
- an existing target is replaced only when the caller allows it *and* it is a folder this tool wrote before
  (``is_replaceable``: a previous export, or an empty folder), never the current folder, one of its parents, or a
  protected folder (the checkpoint being exported) or anything inside or above one;
- hidden staging folders left by a killed run are removed by the next run for the same target. A folder in use is
  held with an ``flock`` by its process (the kernel drops it when the process dies), so a live export's staging
  folder is never taken for a stale one;
- new folders get the mode the umask gives (not ``mkdtemp``'s 0700), so other accounts can read an export.

The swap is ``renameat2(RENAME_EXCHANGE)`` on Linux (one atomic step); elsewhere two renames, and a run killed
between them is repaired by the next run (the old folder is renamed back).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, so no sweeping of other runs' folders
    fcntl = None

__all__ = [
    "OutputExistsError",
    "OutputNotWritableError",
    "OutputProtectedError",
    "check_writable",
    "deferred_signals",
    "is_replaceable",
    "is_writable_folder",
    "nearest_existing",
    "staged_directory",
    "sweep_stale",
]

_PARTIAL, _OLD = "partial", "old"
_MAX_STEM_BYTES = 150  # a stem + ".partial-<16 hex>" must stay under the 255-byte limit of one name


class OutputExistsError(FileExistsError):
    pass


class OutputNotWritableError(PermissionError):
    pass


class OutputProtectedError(OutputExistsError):
    """The target is a folder this tool must never replace (current folder, a checkpoint, a foreign folder)."""


# --- what may be replaced -----------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def is_replaceable(folder: Path, marker: Callable[[Path], bool]) -> bool:
    """True for an empty folder or one ``marker`` recognises as this tool's own output."""
    try:
        return not any(folder.iterdir()) or marker(folder)
    except OSError:
        return False


def check_writable(
    target: Path,
    overwrite: bool,
    *,
    marker: Callable[[Path], bool] | None = None,
    protected: Iterable[Path] = (),
    what: str = "an export",
    option: str = "--out",
) -> None:
    """Fail early, before any work, when ``target`` cannot or must not be written."""
    target = Path(target).absolute()
    resolved = target.resolve()
    if len(target.name.encode()) > 255:
        raise OutputNotWritableError(f"the folder name {target.name[:40]}... is {len(target.name.encode())} bytes "
                                     f"long; file systems allow 255. Choose a shorter {option}.")
    if target.is_symlink():
        raise OutputExistsError(f"{target} is a symbolic link; pass the folder it points to, or another {option}.")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder. Choose another {option}.")
    if target.exists():
        cwd = Path.cwd().resolve()
        if _inside(cwd, resolved):
            raise OutputProtectedError(
                f"{target} is the current folder or one of its parents; it is never replaced. Choose another "
                f"{option}."
            )
        for folder in protected:
            folder = Path(folder).resolve()
            if _inside(folder, resolved) or _inside(resolved, folder):
                raise OutputProtectedError(
                    f"{target} holds or is inside the checkpoint {folder}; it is never replaced. Choose another {option}."
                )
        if not overwrite:
            raise OutputExistsError(f"{target} already exists. Pass --force to replace it, or choose another {option}.")
        if marker is not None and not is_replaceable(target, marker):
            raise OutputProtectedError(
                f"{target} is not {what} made by this tool (no manifest.json saying so), so --force will not replace "
                f"it. Choose another {option}, or delete the folder yourself."
            )
    existing = nearest_existing(target.parent)
    if not is_writable_folder(existing):
        raise OutputNotWritableError(f"cannot write to {target.parent}: {existing} is not a writable folder.")


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest existing parent: where creating ``path`` would have to start."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def is_writable_folder(path: Path) -> bool:
    """A folder this process may create entries in (a read-only mount says no, even to root)."""
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


# --- staging folders, locks and the sweep ---------------------------------------------------------------------


def _stem(target: Path) -> str:
    name = target.name
    if len(name.encode()) <= _MAX_STEM_BYTES:
        return name
    return "~" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{_stem(target)}.{kind}-{secrets.token_hex(8)}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on the folder ``path``, or None when another process holds
    it (or the folder is gone)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _new_locked_folder(target: Path, kind: str) -> tuple[Path, int | None]:
    """Create a hidden sibling folder (mode from the umask) and lock it; retried if a sweeper took it meanwhile."""
    for _ in range(100):
        path = _sibling(target, kind)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        if fcntl is None:
            return path, None
        fd = _try_lock(path)
        if fd is not None and os.path.samestat(os.fstat(fd), os.stat(path)):
            return path, fd
        if fd is not None:
            os.close(fd)
    raise OutputNotWritableError(f"could not create a staging folder next to {target}.")


def _looks_like(folder: Path, marker: Callable[[Path], bool] | None) -> bool:
    return folder.is_dir() and (marker is None or marker(folder))


def sweep_stale(target: str | os.PathLike, marker: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove staging folders that earlier runs for ``target`` left behind (killed runs); if such a run was
    killed between the two renames of a replacement and ``target`` is missing, put the old folder back first.
    Folders locked by a live process are left alone. Returns what was removed or restored."""
    target = Path(target).absolute()
    if fcntl is None or not target.parent.is_dir():
        return []
    stem = _stem(target)
    handled = []
    candidates = sorted(target.parent.glob(f".{stem}.{_OLD}-*")) + sorted(target.parent.glob(f".{stem}.{_PARTIAL}-*"))
    for path in candidates:
        if not path.is_dir() or path.is_symlink():
            continue
        fd = _try_lock(path)
        if fd is None:
            continue  # a live run owns it
        try:
            if path.name.startswith(f".{stem}.{_OLD}-") and not target.exists():
                nested = path / target.name  # the layout of earlier versions: .X.old-*/X
                source = nested if nested.is_dir() else path
                if _looks_like(source, marker):
                    os.rename(source, target)
                    handled.append(target)
            shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
        finally:
            os.close(fd)
    return handled


# --- the atomic swap -------------------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or file system does not offer it (then the caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(destination))


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a power cut after the rename finds them whole."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


@contextmanager
def deferred_signals(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs (a commit that must not stop half-way), then deliver them
    to the handlers that were installed before. Only in the main thread; elsewhere a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


def _commit(staging: Path, target: Path, overwrite: bool, marker: Callable[[Path], bool] | None) -> Path | None:
    """Move ``staging`` to ``target``; returns where the replaced folder now is (to delete), or None."""
    if not target.exists():
        if _renameat2(staging, target, _RENAME_NOREPLACE):
            return None
        try:
            os.rename(staging, target)  # POSIX replaces an empty folder that appeared meanwhile: nothing is lost
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputExistsError(f"{target} appeared during the export; nothing was replaced.") from None
            raise
        return None
    if not overwrite:
        raise OutputExistsError(f"{target} appeared during the export; nothing was replaced.")
    if target.is_symlink() or not target.is_dir() or (marker is not None and not is_replaceable(target, marker)):
        raise OutputProtectedError(f"{target} changed during the export and is no longer a folder this tool may "
                                   "replace; nothing was replaced.")
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging  # staging's name now holds the old folder
    held = _try_lock(target)  # held across both renames, so no sweeper takes the retired folder for a stale one
    if held is None and fcntl is not None:
        raise OutputExistsError(f"{target} is being replaced by another run; nothing was replaced.")
    try:
        retired = _sibling(target, _OLD)
        os.rename(target, retired)  # a run killed right here is repaired by the next run's sweep
        os.rename(staging, target)
    finally:
        if held is not None:
            os.close(held)
    return retired


@contextmanager
def staged_directory(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    marker: Callable[[Path], bool] | None = None,
    protected: Iterable[Path] = (),
    what: str = "an export",
    option: str = "--out",
) -> Iterator[Path]:
    """Yield an empty, locked staging folder next to ``target``; on success swap it into place atomically.

    On any exception (KeyboardInterrupt included) the staging folder is deleted and ``target`` is untouched.
    ``overwrite`` allows replacing an existing ``target``, only if it is empty or ``marker(target)`` is true, and
    never when it is the current folder, one of its parents, or holds or is inside a ``protected`` folder.
    """
    target = Path(target).absolute()
    protected = list(protected)
    check_writable(target, overwrite, marker=marker, protected=protected, what=what, option=option)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputNotWritableError(f"cannot create {target.parent}: {error.strerror}.") from None
    sweep_stale(target, marker)
    staging, lock = _new_locked_folder(target, _PARTIAL)
    committed = False
    try:
        yield staging
        _fsync_tree(staging)
        with deferred_signals():
            retired = _commit(staging, target, overwrite, marker)
            committed = True
            _fsync(target.parent)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        # before the commit this is our half-written folder; after an exchange it is what is left of the old one
        shutil.rmtree(staging, ignore_errors=True)
        if committed:
            error.committed = True  # interrupted after the new folder was in place: say so, do not claim otherwise
        raise
    finally:
        if lock is not None:
            os.close(lock)
