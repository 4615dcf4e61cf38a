"""Every registered model x every norm it takes: forward, backward and eval; rebuilt from
its resolved arguments; a layer table that accounts for every parameter; and the deep
models without a norm still fit a batch.

CPU only. Models whose default input is larger than 64 pixels (the ImageNet VGGs) are
exercised at 64x64. Shape bookkeeping uses the meta device: no memory, no init cost.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cnnray.models import build_model, count_parameters, get_model_spec, layer_table, list_models, resolve_model_args
from tests.helpers.models import input_size, state_shapes


# Every norm a model can use (a model that needs a norm refuses "none": tested in its file).
CASES = [(name, norm) for name in list_models() for norm in get_model_spec(name).norms]


# --- every model x every norm -------------------------------------------------------


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_forward_backward_and_eval(name: str, norm: str) -> None:
    torch.manual_seed(0)
    spec = get_model_spec(name)
    size = input_size(name)
    model = build_model(name, norm=norm, image_size=size)
    x = torch.randn(2, spec.in_channels, *size)

    model.train()
    out = model(x)
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all(), "NaN or inf in the training-mode output"
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    for key, param in model.named_parameters():
        if not param.requires_grad:  # fixed by design (airbench's whitening stem, norm scales)
            continue
        assert param.grad is not None, f"{key} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{key} has a non-finite gradient"

    model.eval()  # batch norm switches to running stats, so a batch of one must work
    with torch.no_grad():
        single = model(x[:1])
    assert single.shape == (1, spec.num_classes)
    assert torch.isfinite(single).all()


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_rebuild_from_resolved_args(name: str, norm: str) -> None:
    args = resolve_model_args(name, norm=norm)
    assert json.loads(json.dumps(args)) == args  # checkpoint-ready as it is
    assert resolve_model_args(name, **args) == args  # resolving again changes nothing
    with torch.device("meta"):
        original = build_model(name, norm=norm)
        rebuilt = build_model(name, **json.loads(json.dumps(args)))
    assert state_shapes(rebuilt) == state_shapes(original)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_layer_table_accounts_for_every_parameter(name: str, norm: str) -> None:
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = build_model(name, norm=norm)
    rows = layer_table(model, (spec.in_channels, *spec.image_size))
    assert [row.index for row in rows] == list(range(1, len(rows) + 1))
    # Every parameter, trained or fixed (count_parameters counts the trained ones only).
    assert sum(row.params for row in rows) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) <= sum(row.params for row in rows)
    assert rows[-1].kind == "Fully connected"
    assert rows[-1].output_shape == (spec.num_classes,)
    has_norm_rows = any(row.kind == "Normalization" for row in rows)
    assert has_norm_rows == (norm != "none")


# --- deep networks without a norm still learn -------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vgg19"])
def test_deep_models_without_norm_fit_a_batch(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, norm="none", image_size=32)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # About 0.3x (resnet18) and 0.75x (vgg19) here; fan_out He init gave 0.97x.
    assert min(losses) < 0.85 * losses[0], losses
