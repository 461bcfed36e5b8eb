"""Running the project's command lines as a user does: a fresh ``python -m ...`` process, its exit code, what it
printed, and checks that an error is one plain line without a traceback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    env.pop("FORCE_COLOR", None)
    return env


def run_cli(module: str, *args, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module args...`` (arguments may be bytes, for non-UTF-8 tries), umask 022."""
    argv = [sys.executable, "-m", module, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, cwd=cwd or ROOT, env=cli_env(), capture_output=True, timeout=timeout,
                          text=True, errors="replace", preexec_fn=lambda: os.umask(0o022))


def popen_cli(module: str, *args, cwd: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", module, *(str(a) for a in args)]
    return subprocess.Popen(argv, cwd=cwd or ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", preexec_fn=lambda: os.umask(0o022))


def assert_refused(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line, last on stderr and containing every fragment.
    Returns that line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included), by relative path: equal digests = untouched."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def siblings(folder: Path) -> list[str]:
    """Hidden staging names next to ``folder`` (what an interrupted run could leave)."""
    return sorted(p.name for p in Path(folder).parent.iterdir() if p.name.startswith(f".{Path(folder).name}."))
