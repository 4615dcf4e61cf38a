"""Errors reach the user as one readable line naming the problem and the path; the details
go to a log file the line names (cnnray.errors.one_line, used by the CLI for every error)."""

from __future__ import annotations

import errno
import re
import shutil

import pytest

from cnnray.cli import main
from cnnray.errors import one_line
from tests.robustness.test_unreadable_images import write_folder


def _full_disk_copy(dest_names):
    """shutil.copytree on a full disk: shutil.Error listing every file it could not write."""

    def copytree(src, dst, *args, **kwargs):
        raise shutil.Error([(f"{src}/{n}", f"{dst}/{n}", f"[Errno 28] No space left on device: '{dst}/{n}'")
                            for n in dest_names])

    return copytree


def _log_of(line: str) -> str:
    m = re.search(r"\(details: (\S+)\)$", line)
    assert m, line
    return m.group(1)


def test_full_disk_during_a_checkpoint_is_one_readable_line(tmp_path, monkeypatch, capsys):
    from cnnray.train import session

    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    write_folder(tmp_path / "imgs", per_format=1)
    names = ["model.pt", "optimizer.pt", "meta.json", "history.json"] + [f"part-{i:04d}.bin" for i in range(20)]
    monkeypatch.setattr(session.shutil, "copytree", _full_disk_copy(names))
    code = main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--local-mode",
                 "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--out", str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cnnray: error")]
    assert code == 1 and len(err) == 1, err
    line = err[0]
    assert len(line) < 500 and "no space left on the device holding " in line and str(tmp_path / "run") in line
    log = open(_log_of(line)).read()
    assert "part-0019.bin" in log and "Traceback" in log  # every failed file, and where it failed


def test_shutil_error_list_is_summarised():
    exc = shutil.Error([(f"/a/{i}", f"/b/{i}", "[Errno 13] Permission denied") for i in range(30)])
    line = one_line(exc)
    assert line.startswith("cannot copy /a/0 to /b/0: [Errno 13] Permission denied (and 29 more)")
    assert "/a/29" in open(_log_of(line)).read()


def test_wrapped_errors_give_the_innermost_line_and_a_log():
    try:
        try:
            raise OSError(errno.EACCES, "Permission denied", "/data/x.png")
        except OSError as inner:
            raise RuntimeError("Traceback (most recent call last):\n  File ...\n" + "x" * 2000
                               + "\nPermissionError: [Errno 13] Permission denied: '/data/x.png'") from inner
    except RuntimeError as e:
        line = one_line(e, trace=True)
    assert line.startswith("PermissionError: [Errno 13] Permission denied: '/data/x.png' (details: ")
    assert "x" * 2000 in open(_log_of(line)).read()


def test_long_messages_are_cut_and_short_ones_kept():
    assert one_line(ValueError("--lr must be positive")) == "--lr must be positive"
    line = one_line(ValueError("y" * 5000))
    assert len(line) < 500 and line.startswith("y" * 100) and "..." in line
    assert "y" * 5000 in open(_log_of(line)).read()


@pytest.mark.parametrize("log_dir_ok", [True, False])
def test_log_falls_back_when_the_folder_cannot_be_written(tmp_path, log_dir_ok):
    folder = tmp_path / ("logs" if log_dir_ok else "missing/deeper")
    if log_dir_ok:
        folder.mkdir()
    line = one_line(ValueError("z" * 1000), log_dir=folder)
    log = _log_of(line)
    assert log.startswith(str(folder)) == log_dir_ok
