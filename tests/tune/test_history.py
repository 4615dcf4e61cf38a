"""A trial's history (cnnray.tune.history) fed the events of a sweep directly, in the
orders a loaded machine, an interrupt or a PBT exploit can give them: no Ray started.

The rows come through the same Train callback a trial's controller runs after each
epoch's checkpoint (`history_callback`); exploits are written as CnnrayPBT writes them."""

from __future__ import annotations

import json

import pytest

from cnnray.files import EXPLOITS_FILE, atomic_write_json
from cnnray.tune.history import EXPLOIT_KEY, history_callback, read_history


def report(sweep, trial, run, epoch, start_epoch=0, acc=None):
    """What the trial's Train controller does after rank 0 reported `epoch`."""
    metrics = {"epoch": epoch, "val_accuracy": acc if acc is not None else epoch / 10,
               "start_epoch": start_epoch, "training_iteration": 7, "checkpoint_path": "/x"}
    history_callback(sweep, trial, run).after_report(None, [metrics, {"epoch": epoch}], None)


def exploit(sweep, to, donor, epoch):
    """CnnrayPBT._exploit's record (it is written before the trial restarts in `<to>-x<n>`)."""
    path = sweep / EXPLOITS_FILE
    exploits = json.loads(path.read_text()) if path.exists() else []
    n = sum(e["to"] == to for e in exploits) + 1
    exploits.append({"from": donor, "to": to, "epoch": epoch, "run": f"{to}-x{n}"})
    atomic_write_json(exploits, path)


def epochs(sweep, trial):
    return [h["epoch"] for h in read_history(sweep, trial)]


def test_rows_hold_the_loops_metrics_and_the_run(tmp_path):
    from cnnray.tune.history import history_file

    report(tmp_path, "w", "w", 1)
    report(tmp_path, "w", "w", 2, start_epoch=1)
    row = read_history(tmp_path, "w")[0]
    assert row == {"run": "w", "epoch": 1, "val_accuracy": 0.1, "start_epoch": 0}  # Tune's keys dropped
    assert len(history_file(tmp_path, "w").read_text().splitlines()) == 2  # one line a row


@pytest.mark.parametrize("order", ["row, exploit, restart", "exploit, row, restart"])
def test_an_exploited_trial_keeps_its_own_epochs_then_the_continued_ones(tmp_path, order):
    """The race seen once as [2] instead of [1, 2]: the weak trial reports epoch 1, PBT
    exploits the donor's epoch-1 checkpoint, the trial restarts and reports epoch 2. Tune
    decides the exploit before its loggers see the result, so both orders are fed."""
    report(tmp_path, "g", "g", 1, acc=0.9)
    if order.startswith("row"):
        report(tmp_path, "w", "w", 1, acc=0.1)
        exploit(tmp_path, "w", "g", 1)
    else:
        exploit(tmp_path, "w", "g", 1)
        report(tmp_path, "w", "w", 1, acc=0.1)
    report(tmp_path, "w", "w-x1", 2, start_epoch=1, acc=0.92)
    history = read_history(tmp_path, "w")
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["val_accuracy"] == 0.1 and EXPLOIT_KEY not in history[0]  # its own epoch 1
    assert history[1]["run"] == "w-x1" and history[1][EXPLOIT_KEY] == {"from": "g", "epoch": 1}
    assert epochs(tmp_path, "g") == [1]


def test_epochs_the_old_run_reported_after_the_exploit_are_dropped(tmp_path):
    """The weak trial's own run may report epoch 2 before PBT's pause stops it: that epoch
    belongs to weights the trial gave up, so the continued run's epoch 2 is the history's,
    and if the sweep stops before the continued run reports, the history ends at epoch 1."""
    report(tmp_path, "w", "w", 1)
    exploit(tmp_path, "w", "g", 1)
    report(tmp_path, "w", "w", 2, acc=0.05)  # the abandoned run's late epoch
    assert epochs(tmp_path, "w") == [1]
    report(tmp_path, "w", "w-x1", 2, start_epoch=1, acc=0.9)
    assert [(h["epoch"], h["run"]) for h in read_history(tmp_path, "w")] == [(1, "w"), (2, "w-x1")]


def test_two_exploits_and_a_missing_record(tmp_path):
    """A second exploit at epoch 2 continues in w-x2; a run whose record was lost (the sweep
    killed between the two writes) still counts from where its first row says it resumed."""
    report(tmp_path, "w", "w", 1)
    exploit(tmp_path, "w", "g", 1)
    report(tmp_path, "w", "w-x1", 2, start_epoch=1)
    exploit(tmp_path, "w", "h", 2)
    report(tmp_path, "w", "w-x2", 3, start_epoch=2)
    history = read_history(tmp_path, "w")
    assert [(h["epoch"], h["run"], h.get(EXPLOIT_KEY)) for h in history] == [
        (1, "w", None), (2, "w-x1", {"from": "g", "epoch": 1}), (3, "w-x2", {"from": "h", "epoch": 2})]
    report(tmp_path, "v", "v", 1)
    report(tmp_path, "v", "v-x1", 2, start_epoch=1)  # no exploits.json entry for v
    assert [(h["epoch"], h.get(EXPLOIT_KEY)) for h in read_history(tmp_path, "v")] == [
        (1, None), (2, {"from": None, "epoch": 1})]


def test_a_resumed_trial_keeps_the_epochs_before_the_interrupt(tmp_path):
    """Ctrl-C during epoch 2, --resume: the run goes on from its epoch-1 checkpoint and
    reports 2 and 3; the history is [1, 2, 3], not [3] or [2, 3]."""
    report(tmp_path, "t", "t", 1)
    report(tmp_path, "t", "t", 2, start_epoch=1, acc=0.2)
    report(tmp_path, "t", "t", 2, start_epoch=1, acc=0.25)  # epoch 2 rerun: the latest report stays
    report(tmp_path, "t", "t", 3, start_epoch=2)
    history = read_history(tmp_path, "t")
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[1]["val_accuracy"] == 0.25


def test_a_trial_resumed_from_its_last_checkpoint_keeps_its_history(tmp_path):
    """Interrupted just after its last checkpoint: the resumed run has nothing left to
    train and reports nothing; the history (and so the sweep's results) still holds every epoch."""
    for e in (1, 2):
        report(tmp_path, "t", "t", e, start_epoch=e - 1)
    assert epochs(tmp_path, "t") == [1, 2]  # no report after the resume: nothing to change


def test_a_torn_last_line_is_skipped(tmp_path):
    from cnnray.tune.history import history_file

    report(tmp_path, "t", "t", 1)
    with open(history_file(tmp_path, "t"), "a") as f:
        f.write('{"run": "t", "epo')  # killed mid-write
    assert epochs(tmp_path, "t") == [1]
    report(tmp_path, "t", "t", 2, start_epoch=1)  # the next row starts on a line of its own
    assert epochs(tmp_path, "t") == [1, 2]
    lines = history_file(tmp_path, "t").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == "" and all(lines[:3])  # and no blank line between rows


def test_an_epoch_registered_but_not_appended_comes_from_trains_snapshot(tmp_path):
    """Stopped between Train's registration of epoch 2's checkpoint and the append: the
    resume continues after epoch 2, so the history takes epoch 2 from Train's snapshot of
    registered checkpoints (runs/<run>/checkpoint_manager_snapshot.json)."""
    report(tmp_path, "t", "t", 1)
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    snapshot = {"checkpoint_results": [
        {"checkpoint_dir_name": f"epoch-000{e}", "metrics": {"epoch": e, "val_accuracy": 0.5, "start_epoch": 0}}
        for e in (1, 2)]}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    (tmp_path / "runs" / "t2").mkdir()  # another trial whose id starts the same: not read
    (tmp_path / "runs" / "t2" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    history = read_history(tmp_path, "t")
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["val_accuracy"] == 0.1  # the file's row wins
    report(tmp_path, "t", "t", 3, start_epoch=2)
    assert epochs(tmp_path, "t") == [1, 2, 3]
