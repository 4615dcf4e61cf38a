"""Names are drawn literally (issue 18): class, model, run and trial names appear as typed
in every picture, page and log line; names that cannot be shown so are refused up front.

Allowed: any printable text (`Ba$$in`, `<b>x</b>` where no folder is involved, `50%_off`, `$5 & {x}`, any script).
Refused with one line: control characters (`a\\nb`, tabs, escapes) and bytes that are not
UTF-8, in class folders and in paths (so in run names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnray.report import plots, write_report
from tests.helpers.report import make_run, pattern

NAMES = ("Ba$$in", "$x$ <b>bold", "50%_off {0} & \\n")  # "/" cannot be in a folder name


def _folder(root: Path, classes, side: int = 28, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(pattern(c % 3, side, 1, rng)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def drawn_texts(monkeypatch):
    """Every matplotlib Text of every figure the report saves: (text, parse_math)."""
    from matplotlib.text import Text

    seen: list[tuple[str, bool]] = []
    save = plots.save_png

    def spy(fig, path):
        out = save(fig, path)  # draws the figure: a mathtext error would raise here
        seen.extend((t.get_text(), t.get_parse_math()) for t in fig.findobj(Text) if t.get_text())
        return out

    monkeypatch.setattr(plots, "save_png", spy)
    return seen


def test_report_draws_class_and_run_names_as_typed(tmp_path, data_cache, drawn_texts):
    """`Ba$$in` made `cnnray report` exit 1 (matplotlib parsed "$$" as mathematics)."""
    data = _folder(tmp_path / "data", NAMES)
    run = tmp_path / "runs" / "run $1 <i>"
    make_run(run, "cnn", data)
    page = write_report(run)
    classes = sorted(NAMES)
    for name in classes:  # tick labels, mistake titles, response title: shown as typed
        drawn = [(t, pm) for t, pm in drawn_texts if name in t]
        assert drawn, f"{name!r} is not drawn"
        assert all(pm is False for _, pm in drawn), f"{name!r} drawn as mathtext"
    assert all(pm is False for t, pm in drawn_texts if "$" in t)
    text = page.read_text()
    assert "Ba$$in" in text and "$x$ &lt;b&gt;bold" in text and "50%_off {0} &amp; \\n" in text
    assert "<b>bold" not in text and "<i>" not in text  # (the page has <b> tags of its own)
    assert "run $1 &lt;i&gt;" in text  # the run name in the title


def test_sweep_pictures_draw_trial_names_and_values_as_typed(tmp_path, drawn_texts):
    from cnnray.report.sweep import plot_hyperparameters, plot_trial_curves

    trials = [{"trial_id": f"t$$${i}", "lr": 0.01 * (i + 1), "momentum": 0.5 + 0.1 * i, "norm": "$n$",
               "best_val_accuracy": 0.5 + 0.1 * i, "stopped_early": False} for i in range(3)]
    hist = {t["trial_id"]: [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0},
                            {"epoch": 2, "val_accuracy": t["best_val_accuracy"], "val_loss": 0.8}] for t in trials}
    plot_trial_curves(hist, trials, "t$$$0", tmp_path / "trials.png")
    plot_hyperparameters(trials, "t$$$0", tmp_path / "hyperparams.png")
    assert any("t$$$1" in t for t, _ in drawn_texts) and any("$n$" in t for t, _ in drawn_texts)
    assert all(pm is False for t, pm in drawn_texts if "$" in t)


def test_tune_plot_draws_names_as_typed(tmp_path):
    from cnnray.config import TrainConfig
    from cnnray.tune.plots import plot_sweep

    rows = [{"trial_id": "a", "lr": 0.01, "norm": "$$", "best_val_accuracy": 0.9, "stopped_early": False}]
    plot_sweep(rows, TrainConfig(), tmp_path / "sweep.png", best_trial="a")  # "$$" would raise as mathtext
    assert (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("bad", ["a\nb", "tab\there", "esc\x1b"])
def test_class_folders_that_cannot_be_shown_are_refused(tmp_path, data_cache, bad):
    from cnnray.data import DataError, load_dataset

    data = _folder(tmp_path / "data", ("fine", bad), per_class=2)
    with pytest.raises(DataError, match="class folder .* contains a control character") as e:
        load_dataset("imagefolder", data)
    assert "\n" not in str(e.value)


def test_run_names_that_cannot_be_shown_exit_2(tmp_path, capsys):
    from cnnray.cli import main

    assert main(["train", "--out", str(tmp_path / "a\nb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "control character" in err
