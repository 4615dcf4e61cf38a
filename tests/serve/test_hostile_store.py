"""Hostile clients and careless colleagues against cnnray serve: whatever appears in a model
store, and files that follow the umask.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.helpers.serve import MNIST_INFO, save_model


# --- 5. whatever appears in the model store -------------------------------------------------------
def test_versions_are_ascii_decimals():
    from cnnray.store import parse_version

    assert [parse_version(s) for s in ["1", "12", "02", "0", "²", "٣", "-1", "1 ", "+1", "1e3"]] == [
        1, 12, None, None, None, None, None, None, None, None]


def test_store_scan_skips_and_reports_what_is_not_a_version(tmp_path, good_checkpoint):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export, scan

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    for odd in ["²", "٣", "02"]:  # str.isdigit() says yes to each; int("٣") is 3
        shutil.copytree(good_checkpoint, store / "digits" / odd)
    (store / "digits" / "3").write_text("not a folder")
    (store / "README.txt").write_text("a stray file")
    found = scan(store)
    assert found.models == {"digits": [1]}
    text = "\n".join(found.problems)
    for odd in ["'²'", "'٣'", "'02'", "digits/3: a file", "README.txt"]:
        assert odd in text, text
    res = resolve(ServeArgs(model_store=str(store)))
    assert res.models["digits"].version == 1
    assert str(tmp_path) not in "\n".join(res.problems)  # store-relative: no server paths


def test_a_version_still_being_copied_is_skipped_until_complete(tmp_path, good_checkpoint):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    partial = store / "digits" / "2"
    partial.mkdir()
    shutil.copyfile(good_checkpoint / "model.pt", partial / "model.pt")  # meta.json not yet
    args = ServeArgs(model_store=str(store))
    bad: dict = {}
    first = resolve(args, None, bad)
    assert first.models["digits"].version == 1
    assert any(p.startswith("digits/2: skipped") and "meta.json" in p for p in first.problems), first.problems
    shutil.copyfile(good_checkpoint / "meta.json", partial / "meta.json")  # the copy completes
    second = resolve(args, first.models, bad)
    assert second.models["digits"].version == 2 and not second.problems


def test_refresh_keeps_serving_whatever_the_store_holds(tmp_path, good_checkpoint, monkeypatch):
    from cnnray.serve.runner import ServeRunner
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    runner = ServeRunner(ServeArgs(model_store=str(store)))
    deployed: list = []
    monkeypatch.setattr(runner, "_deploy", lambda: deployed.append((dict(runner.models), list(runner.problems))))
    runner.refresh()
    assert runner.models["digits"].version == 1
    (store / "digits" / "2").mkdir()  # an in-progress copy
    (store / "digits" / "²").mkdir()
    (store / "digits" / "4").write_text("")
    assert runner.refresh() == {}  # nothing new to serve, no exception
    assert runner.models["digits"].version == 1 and len(runner.problems) == 3, runner.problems
    assert deployed[-1][1] == runner.problems  # the replicas get the problems to report
    shutil.rmtree(store)  # even the store going away does not stop serving
    runner.refresh()
    assert runner.models["digits"].version == 1


def test_an_unreadable_folder_is_reported_not_raised(tmp_path, good_checkpoint, monkeypatch):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    export(good_checkpoint, store, "other")
    (store / "other").chmod(0o700)
    real_iterdir = Path.iterdir

    def iterdir(self):  # another user's 0700 folder, as this (possibly root) account cannot fake it
        if self.name == "other":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    res = resolve(ServeArgs(model_store=str(store)))
    assert set(res.models) == {"digits"}
    assert res.problems == ["other/: cannot read the folder: permission denied"], res.problems


def test_export_never_loops_on_a_file_named_like_the_next_version(tmp_path, good_checkpoint):
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    (store / "digits" / "2").write_text("a file, not a version")
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("path", export(good_checkpoint, store, "digits")),
                         daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "export spins on a file named like the next version"
    assert done["path"] == store / "digits" / "3"


# --- 6. files follow the umask ------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from cnnray.checkpoint import atomic_write_bytes, atomic_write_json
    from cnnray.store import export

    old = os.umask(umask)
    try:
        ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
        atomic_write_json({"a": 1}, tmp_path / "result.json")
        atomic_write_bytes(b"<html></html>", tmp_path / "report.html")
        version = export(ck, tmp_path / "store", "digits")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    for f in [ck / "meta.json", ck / "model.pt", tmp_path / "result.json", tmp_path / "report.html",
              version / "meta.json", version / "model.pt"]:
        assert mode(f) == file_mode, f"{f}: {oct(mode(f))}"
    assert mode(version) == dir_mode, oct(mode(version))
