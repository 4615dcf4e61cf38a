"""The page sections that come from a checkpoint: the test set, the first conv layer's
filters, response maps of one test image, and the layer table.

Shared by run reports and sweep reports (which show them for the best trial).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cnnray.config import TrainConfig
from cnnray.report import html, plots

MAX_MISTAKES = 24  # images in the misclassified grid (4 rows of 6)


@dataclass
class CheckpointReport:
    sections: list[html.Section] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # one-line observations for the summary
    test_accuracy: float | None = None  # as measured here


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def chance_finding(accuracy: float, per_class: list[int], classes: list[str]) -> str:
    """Test accuracy against chance: the share of the most common test class (what always
    answering that class scores; 1/K for balanced classes). Within two binomial standard
    errors of it, sqrt(p (1 - p) / n), the accuracy is called chance level."""
    n = sum(per_class)
    top = max(range(len(per_class)), key=per_class.__getitem__)
    base = per_class[top] / n
    margin = 2 * (base * (1 - base) / n) ** 0.5
    what = f"{_pct(base)}, always answering the most common test class {classes[top]}"
    if abs(accuracy - base) <= margin:
        return (f"Test accuracy {_pct(accuracy)} is at chance level ({what}; within two standard errors, "
                f"{_pct(margin)}): the model has not learned to tell the classes apart.")
    if accuracy < base:
        return f"Test accuracy {_pct(accuracy)} is {100 * (base - accuracy):.2f} points below chance ({what})."
    return f"Test accuracy {_pct(accuracy)} is {100 * (accuracy - base):.2f} points above chance ({what})."


def checkpoint_report(
    ckpt_dir: Path, cfg: TrainConfig, out_dir: Path, *, recorded_test_accuracy: float | None = None
) -> CheckpointReport:
    """Evaluate the checkpoint on cfg's test split and draw what is inside the model."""
    from cnnray.checkpoint import load_model
    from cnnray.data import DataError
    from cnnray.models import format_layer_table, layer_table
    from cnnray.report.evaluate import conv_layers, conv_responses, evaluate_test_set

    rep = CheckpointReport()
    model, meta = load_model(ckpt_dir)
    data = meta["data"]
    classes = [str(c) for c in data["classes"]]
    input_shape = tuple(int(d) for d in data["input_shape"])
    where = f"checkpoint {Path(ckpt_dir).name} (epoch {meta.get('epoch', '?')})"

    # --- test set
    preds = None
    try:
        preds = evaluate_test_set(model, cfg)
    except DataError as e:  # e.g. a cluster run whose data this machine cannot read
        rep.sections.append(html.Section("Test set", html.note(f"Test set not evaluated: {e}")))
    if preds is not None and len(preds.labels):
        rep.test_accuracy = preds.accuracy
        body = [html.paragraph(
            f"The {where} evaluated here on the {len(preds.labels):,} test images "
            f"({cfg.dataset}{f', subset {cfg.subset} seed {cfg.seed}' if cfg.subset else ''}): accuracy "
            f"{_pct(preds.accuracy)}."
        )]
        if recorded_test_accuracy is not None and abs(recorded_test_accuracy - preds.accuracy) > 1e-4:
            body.append(html.note(
                f"The run recorded a test accuracy of {_pct(recorded_test_accuracy)}, but this evaluation gives "
                f"{_pct(preds.accuracy)}: the data or the checkpoint changed since training, or the precision differs "
                "(training may evaluate in bf16, this page in float32)."
            ))
        cm = preds.confusion()
        rep.findings.append(chance_finding(preds.accuracy, cm.sum(1).tolist(), classes))
        rep.pngs.append(plots.plot_confusion(cm, classes, out_dir / "confusion.png"))
        body.append(html.figure(rep.pngs[-1], "Confusion matrix on the test set: rows are the true classes, "
                                "columns the predictions; colour is the share of the row."))
        per_class = cm.diag().double() / cm.sum(1).clamp(min=1).double()
        off = cm.clone().fill_diagonal_(0)
        pairs = [(int(off.view(-1)[i]), *divmod(int(i), len(classes))) for i in off.view(-1).argsort(descending=True)[:5]]
        pairs = [(n, t, p) for n, t, p in pairs if n > 0]
        confusions = html.table(("true class", "predicted as", "times"), [(classes[t], classes[p], n) for n, t, p in pairs],
                                numeric=(2,)) if pairs else ""
        if pairs:
            n, t, p = pairs[0]
            rep.findings.append(f"Most frequent confusion: true {classes[t]} predicted as {classes[p]} ({n} times).")
        worst = int(per_class.argmin())
        rep.findings.append(
            f"Per-class test accuracy ranges from {_pct(float(per_class.min()))} (class {classes[worst]}) "
            f"to {_pct(float(per_class.max()))}."
        )
        body.append(html.row(html.table(
            ("class", "test images", "correct", "accuracy"),
            [(c, f"{int(cm[i].sum()):,}", f"{int(cm[i, i]):,}", _pct(float(per_class[i]))) for i, c in enumerate(classes)],
            numeric=(1, 2, 3),
        ), confusions))
        worst_idx = preds.most_confident_mistakes(MAX_MISTAKES)
        if len(worst_idx):
            p = preds.preds[worst_idx]
            rep.pngs.append(plots.plot_mistakes(
                preds.images[worst_idx], preds.labels[worst_idx].tolist(), p.tolist(),
                preds.probs[worst_idx, p].tolist(), classes, out_dir / "mistakes.png",
            ))
            body.append(html.figure(rep.pngs[-1], f"The {len(worst_idx)} most confidently misclassified test images "
                                    "(of {0:,} mistakes), with the model's confidence in its wrong answer.".format(
                                        int((preds.preds != preds.labels).sum()))))
        else:
            body.append(html.paragraph("No test image is misclassified."))
        rep.sections.append(html.Section("Test set", "".join(body)))

    # --- inside the model
    convs = conv_layers(model)
    if not convs:
        rep.sections.append(html.Section("Filters and response maps", html.note(
            f"{meta['model']['name']} has no convolutional layers: there are no filters or response maps to show "
            "(its first layer sees the image as one flat vector)."
        )))
    else:
        first_name, first = convs[0]
        rep.pngs.append(plots.plot_filters(first.weight, out_dir / "filters.png", name=f"first conv layer ({first_name})"))
        body = [html.figure(rep.pngs[-1], "The learned filters of the first convolutional layer. Each one is a small "
                            "template the layer matches at every position of the image.")]
        if preds is not None and len(preds.labels):
            i = 0  # the first test image: the same picture on every report of this dataset
            responses = conv_responses(model, preds.normalized(i, data))
            t, p = int(preds.labels[i]), int(preds.preds[i])
            title = f"test image 0: true {classes[t]}, predicted {classes[p]} ({100 * float(preds.probs[i, p]):.0f}%)"
            rep.pngs.append(plots.plot_responses(preds.images[i], responses, out_dir / "responses.png", title))
            body.append(html.figure(rep.pngs[-1], f"Response maps (feature maps) of one test image at each of the "
                                    f"{len(responses)} conv layers: the conv outputs before normalisation and activation, "
                                    f"the {plots.GRID_COLUMNS} channels with the most contrast, each scaled to its own "
                                    "range. Bright spots mark where the image matches that channel's filter best."))
        rep.sections.append(html.Section("Filters and response maps", "".join(body)))

    # --- layers
    rows = layer_table(model, input_shape)
    (out_dir / "layers.txt").write_text(format_layer_table(rows, input_shape=input_shape) + "\n")
    rep.sections.append(html.Section("Layers", html.paragraph(
        f"{meta['model']['name']} ({', '.join(f'{k}={v}' for k, v in meta['model']['args'].items())}): output "
        "shape and learned parameters of every layer for one input, in the lecture's VGG19 table format "
        "(also in layers.txt)."
    ) + html.layer_table(rows, input_shape)))
    return rep
