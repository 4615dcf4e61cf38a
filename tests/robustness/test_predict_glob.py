"""`cnnray predict imgs/*`: every readable file classified, every other one named, then exit 2."""

from __future__ import annotations

import pytest

from cnnray.cli import main
from tests.helpers.serve import LocalServer
from tests.robustness.helpers import png, save_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cnnray.serve.schemas import ModelRef

    root = tmp_path_factory.mktemp("predict-glob")
    s = LocalServer({"digits": ModelRef(path=str(save_model(root / "digits")), version=1)})
    yield s
    s.stop()


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        p = folder / f"{i}.png"
        p.write_bytes(png(i))
        names.append(str(p))
    return names


def _run(capsys, url, files):
    code = main(["predict", "--url", url, "--model", "digits", *files])
    out, err = capsys.readouterr()
    return code, out, err


def test_subfolder_among_pngs(server, tmp_path, capsys):
    pngs = _images(tmp_path / "imgs")
    (tmp_path / "imgs" / "more").mkdir()
    files = sorted([*pngs, str(tmp_path / "imgs" / "more")])  # as the shell expands imgs/*
    code, out, err = _run(capsys, server.url, files)
    assert code == 2
    assert [line.split()[0] for line in out.splitlines()] == pngs  # every PNG classified
    assert f"not classified: {tmp_path / 'imgs' / 'more'}: is a folder" in err


def test_text_file_among_pngs(server, tmp_path, capsys):
    pngs = _images(tmp_path / "imgs", n=4)
    notes = tmp_path / "imgs" / "2-notes.txt"
    notes.write_text("not an image\n")
    files = sorted([*pngs, str(notes)])
    code, out, err = _run(capsys, server.url, files)
    assert code == 2
    assert [line.split()[0] for line in out.splitlines()] == pngs
    assert f"not classified: {notes}: not an image" in err
    assert "1 of 5 file(s) not classified" in err


def test_truncated_png_the_server_refuses_is_named_and_the_rest_classified(server, tmp_path, capsys):
    pngs = _images(tmp_path / "imgs", n=3)
    broken = tmp_path / "imgs" / "1b.png"
    broken.write_bytes(png(7)[:60])  # a PNG header, then the data cut short: only decoding finds it
    files = sorted([*pngs, str(broken)])
    code, out, err = _run(capsys, server.url, files)
    assert code == 2
    assert [line.split()[0] for line in out.splitlines()] == pngs
    assert f"not classified: {broken}:" in err


def test_all_readable_exit_0(server, tmp_path, capsys):
    pngs = _images(tmp_path / "imgs", n=2)
    code, out, err = _run(capsys, server.url, pngs)
    assert code == 0 and len(out.splitlines()) == 2 and err == ""
