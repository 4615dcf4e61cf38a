"""Every sentence the report writes is true of the numbers it describes: histories that
rise, stay flat and fall, each checked sentence by sentence."""

from __future__ import annotations

import pytest

from cnnray.report.run import training_findings
from cnnray.report.sections import chance_finding


def _history(val_acc, train_acc=None, train_loss=None, val_loss=None, steps=100):
    n = len(val_acc)
    train_acc = train_acc or val_acc
    train_loss = train_loss or [1.0 - 0.1 * i for i in range(n)]
    val_loss = val_loss or [1.0 - 0.1 * i for i in range(n)]
    return [
        {"epoch": i + 1, "val_accuracy": val_acc[i], "train_accuracy": train_acc[i], "train_loss": train_loss[i],
         "val_loss": val_loss[i], "samples_per_second": 1000.0, "epoch_seconds": 2.0, "lr": 0.0,
         "step_lrs": [0.1] * steps}
        for i in range(n)
    ]


def _find(findings, start):
    (line,) = [f for f in findings if f.startswith(start)]
    return line


def test_the_issues_run_at_chance_does_not_say_its_loss_fell():
    """2 classes x 300 PNGs with the defaults: 4 steps an epoch, loss 0.771 -> 1.314, 50%."""
    history = _history([0.5, 0.5, 0.5], [0.52, 0.49, 0.5], [0.771, 0.9, 1.314], [0.70, 0.72, 0.75], steps=4)
    findings = training_findings(history, {"test_accuracy": 0.5, "best_val_accuracy": 0.5})
    assert not any("fell" in f for f in findings)
    assert _find(findings, "Training loss") == "Training loss rose from 0.771 to 1.314: training made the fit worse."
    assert _find(findings, "Validation accuracy") == (
        "Validation accuracy stayed between 50.00% and 50.00% over all 3 epochs: it did not improve.")
    assert _find(findings, "The run took") == (
        "The run took 12 optimizer steps (4 per epoch): fewer than 100, where runs often end far below what the "
        "model can learn, or at chance; more epochs or a smaller batch give more steps.")


def test_rising_history():
    history = _history([0.90, 0.95, 0.97], [0.88, 0.94, 0.97], [0.5, 0.3, 0.2], [0.4, 0.25, 0.15])
    findings = training_findings(history, {"test_accuracy": 0.968, "best_val_accuracy": 0.97})
    assert _find(findings, "Validation accuracy") == (
        "Validation accuracy was still rising at the last epoch (95.00% -> 97.00%): more epochs would probably help.")
    assert _find(findings, "Training and validation") == (
        "Training and validation accuracy end 0.0 points apart and the validation loss did not rise: "
        "no sign of overfitting.")
    assert _find(findings, "Training loss") == "Training loss fell from 0.500 to 0.200."
    assert _find(findings, "The run took") == "The run took 300 optimizer steps (100 per epoch)."
    assert _find(findings, "Test accuracy") == ("Test accuracy 96.80% vs best validation 97.00% (-0.20 points): "
                                                "the validation split was a fair guide to unseen data.")


def test_levelled_off_history():
    history = _history([0.90, 0.95, 0.9505])
    assert _find(training_findings(history, {}), "Validation accuracy") == (
        "Validation accuracy rose from 90.00% to 95.05% and levelled off in the last epoch (+0.05 points).")


def test_falling_history_peaks_then_overfits():
    history = _history([0.95, 0.97, 0.93], [0.95, 0.99, 1.0], [0.4, 0.1, 0.05], [0.2, 0.15, 0.4])
    findings = training_findings(history, {"test_accuracy": 0.90, "best_val_accuracy": 0.97})
    assert _find(findings, "Validation accuracy") == (
        "Validation accuracy peaked at epoch 2 (97.00%) and ended 4.0 points lower, at 93.00%; the best checkpoint "
        "is the one evaluated on the test set.")
    assert _find(findings, "Training accuracy") == (
        "Training accuracy ends 7.0 points above validation and the validation loss rose from 0.150 (epoch 2) "
        "to 0.400: the model overfits.")
    assert "poor guide" in _find(findings, "Test accuracy")


def test_a_gap_without_a_rising_validation_loss_is_not_called_overfitting():
    history = _history([0.80, 0.85], [0.85, 0.95], [0.6, 0.3], [0.7, 0.5])
    line = _find(training_findings(history, {}), "Training accuracy")
    assert line == ("Training accuracy ends 10.0 points above validation, but the validation loss did not rise: "
                    "the gap alone does not show overfitting.")
    assert "overfits" not in line


def test_a_small_gap_with_a_rising_validation_loss_is_an_early_sign():
    history = _history([0.97, 0.975], [0.97, 0.98], [0.3, 0.2], [0.10, 0.12])
    assert _find(training_findings(history, {}), "Training and validation") == (
        "Training and validation accuracy end 0.5 points apart, but the validation loss rose from 0.100 (epoch 1) "
        "to 0.120: an early sign of overfitting.")


def test_validation_above_training():
    history = _history([0.9, 0.95], [0.85, 0.92])
    assert _find(training_findings(history, {}), "Validation accuracy ends").startswith(
        "Validation accuracy ends 3.0 points above training accuracy")


def test_flat_loss_stays():
    history = _history([0.5, 0.6], train_loss=[0.693, 0.690])
    assert _find(training_findings(history, {}), "Training loss") == "Training loss stayed near 0.693 (0.693 -> 0.690)."


def test_divergence_names_the_first_bad_epoch_and_reads_only_finite_epochs():
    history = _history([0.9, 0.1, 0.1], train_loss=[0.5, float("nan"), float("nan")])
    findings = training_findings(history, {})
    assert findings[0] == "Training diverged: the loss is first not finite in epoch 2."
    assert _find(findings, "One epoch only") == "One epoch only: validation accuracy 90.00%."
    assert not any("nan" in f for f in findings)


def test_one_epoch():
    findings = training_findings(_history([0.9]), {})
    assert "One epoch only: validation accuracy 90.00%." in findings
    assert not any(f.startswith("Training loss") for f in findings)  # nothing to compare with


@pytest.mark.parametrize(
    "accuracy, counts, expected",
    [
        (0.5, [150, 150], "Test accuracy 50.00% is at chance level (50.00%, always answering the most common test "
                          "class a; within two standard errors, 5.77%): the model has not learned to tell the classes "
                          "apart."),
        (0.9, [150, 150], "Test accuracy 90.00% is 40.00 points above chance (50.00%, always answering the most "
                          "common test class a)."),
        (0.8, [900, 100], "Test accuracy 80.00% is 10.00 points below chance (90.00%, always answering the most "
                          "common test class a)."),
        (0.93, [90, 910], "Test accuracy 93.00% is 2.00 points above chance (91.00%, always answering the most "
                          "common test class b)."),
    ],
)
def test_chance_is_the_most_common_class_and_its_noise(accuracy, counts, expected):
    assert chance_finding(accuracy, counts, ["a", "b"]) == expected
