"""Safe output folders (export/staging.py): what --force may replace, atomic swaps, crash repair, stale-folder
sweeps, locks, modes, long names, signals held during a commit."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat

import pytest

from safeio import staging
from export.manifest import is_export_folder
from safeio.staging import (
    OutputExistsError,
    OutputNotWritableError,
    OutputProtectedError,
    deferred_signals,
    staged_directory,
    sweep_stale,
)
from safeio.terminal import Terminated, termination_as_interrupt


def _export_folder(path, tag="old"):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "gptmeg-export/1", "tag": tag}))
    (path / "model.onnx").write_bytes(tag.encode() * 100)
    return path


def _tag(path):
    return json.loads((path / "manifest.json").read_text())["tag"]


def _write_new(folder):
    (folder / "manifest.json").write_text(json.dumps({"format": "gptmeg-export/1", "tag": "new"}))


def _hidden(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_force_replaces_a_previous_export(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(staging, "_renameat2", lambda *args: False)
    target = _export_folder(tmp_path / "out")
    with staged_directory(target, overwrite=True, marker=is_export_folder) as folder:
        _write_new(folder)
    assert _tag(target) == "new" and not (target / "model.onnx").exists()
    assert _hidden(tmp_path) == []


def test_new_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out", marker=is_export_folder) as folder:
            _write_new(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


@pytest.mark.parametrize("content", ["notes.txt", None], ids=["foreign-folder", "empty-folder"])
def test_force_replaces_only_exports_or_empty_folders(tmp_path, content):
    target = tmp_path / "out"
    target.mkdir()
    if content:
        (target / content).write_text("mine")
        with pytest.raises(OutputProtectedError, match="not an export made by this tool"):
            with staged_directory(target, overwrite=True, marker=is_export_folder):
                pytest.fail("must refuse before yielding")
        assert (target / content).read_text() == "mine"
    else:
        with staged_directory(target, overwrite=True, marker=is_export_folder) as folder:
            _write_new(folder)
        assert _tag(target) == "new"


def test_protected_folders_are_never_replaced(tmp_path, monkeypatch):
    checkpoint = _export_folder(tmp_path / "parent" / "ckpt")  # even when it looks like an export
    monkeypatch.chdir(checkpoint)
    for target, match in [(checkpoint, "current folder"), (tmp_path / "parent", "current folder")]:
        with pytest.raises(OutputProtectedError, match=match):
            staging.check_writable(target, True, marker=is_export_folder)
    monkeypatch.chdir(tmp_path)
    inside = _export_folder(checkpoint / "onnx")
    for target in (checkpoint, tmp_path / "parent", inside):
        with pytest.raises(OutputProtectedError, match="checkpoint"):
            staging.check_writable(target, True, marker=is_export_folder, protected=[checkpoint])


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(tmp_path):
    """The state a run killed between rename(target -> old) and rename(staging -> target) leaves (the fallback
    path without renameat2): the target is missing. The next run puts the old export back and cleans up."""
    target = _export_folder(tmp_path / "out")
    os.rename(target, tmp_path / ".out.old-0123456789abcdef")
    partial = tmp_path / ".out.partial-fedcba9876543210"
    partial.mkdir()
    (partial / "model.onnx").write_bytes(b"half")
    assert not target.exists()
    handled = sweep_stale(target, is_export_folder)
    assert target in handled and _tag(target) == "old"
    assert _hidden(tmp_path) == []


def test_the_nested_layout_of_earlier_versions_is_repaired_too(tmp_path):
    target = _export_folder(tmp_path / "out")
    retired = tmp_path / ".out.old-2x35aut4"
    retired.mkdir()
    os.rename(target, retired / "out")
    with staged_directory(target, overwrite=True, marker=is_export_folder) as folder:
        assert _tag(target) == "old"  # restored before the new run works
        _write_new(folder)
    assert _tag(target) == "new" and _hidden(tmp_path) == []


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    target = tmp_path / "out"
    live, dead = tmp_path / ".out.partial-live", tmp_path / ".out.partial-dead"
    live.mkdir()
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"x" * 1000)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running export holds
    try:
        assert sweep_stale(target) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        os.close(fd)
    assert sweep_stale(target) == [live]


def test_target_appearing_during_the_run_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared during the export"):
        with staged_directory(target, marker=is_export_folder) as folder:
            _write_new(folder)
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert (target / "theirs.txt").read_text() == "theirs" and _hidden(tmp_path) == []


def test_long_names_work_and_too_long_names_are_refused(tmp_path):
    long = tmp_path / ("e" * 245)  # legal, but ".<name>.partial-<hex>" would not be
    with staged_directory(long, marker=is_export_folder) as folder:
        _write_new(folder)
    assert _tag(long) == "new" and _hidden(tmp_path) == []
    with pytest.raises(OutputNotWritableError, match="255"):
        staging.check_writable(tmp_path / ("e" * 300), False)


def test_symlinked_target_is_refused(tmp_path):
    real = _export_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        staging.check_writable(tmp_path / "link", True, marker=is_export_folder)


def test_an_exception_removes_the_staging_folder_and_keeps_the_target(tmp_path):
    target = _export_folder(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(target, overwrite=True, marker=is_export_folder) as folder:
            _write_new(folder)
            raise KeyboardInterrupt
    assert _tag(target) == "old" and _hidden(tmp_path) == []


def test_signals_are_held_during_a_commit_and_delivered_after(tmp_path):
    reached = []
    with pytest.raises(Terminated) as caught:
        with termination_as_interrupt():
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("end of the commit block")
            reached.append("after")  # not reached: the held SIGTERM is delivered on leaving the block
    assert reached == ["end of the commit block"] and caught.value.signum == signal.SIGTERM
