"""The optimiser (cnnray/train/optim.py): airbench's parameter groups and triangle
schedule, Lookahead, and frozen parameters in the training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnray.config import TrainConfig
from cnnray.models import build_model
from cnnray.train.optim import Lookahead, build_optimizer, build_scheduler, triangle

SMALL = {"widths": [8, 16, 16]}  # a narrow airbench: the same layers, fast on a CPU


def test_norm_lr_scale_groups_and_the_triangle_schedule() -> None:
    model = build_model("airbench", **SMALL)
    cfg = TrainConfig(model="airbench", dataset="cifar10", norm="batch", lr=1.5, weight_decay=0.001,
                      norm_lr_scale=64.0, schedule="triangle", epochs=2)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    weights, biases, norms = opt.param_groups
    norm_shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in norms["params"]} == norm_shifts  # norm scales are fixed, not trained
    assert [id(p) for p in biases["params"]] == [id(model.whiten.bias)]  # not a norm: lr x 1
    assert (norms["lr"], weights["lr"]) == (1.5 * 64, 1.5)
    # The same decay per step (lr * weight_decay) as the weights: airbench's bias scaler.
    assert norms["lr"] * norms["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])
    assert biases["weight_decay"] == 0.0
    assert all(not p.requires_grad for p in (model.whiten.weight, model.block1.norm1.weight))

    steps = 50
    sched = build_scheduler(cfg, opt, steps)
    rates = []
    for _ in range(2 * steps):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    total = 2 * steps
    # The paper's schedule: 0.2x at the start, the peak at 23% of the steps, 0.07x at the end.
    assert rates[0][0] == pytest.approx(0.2 * 1.5)
    assert rates[int(0.23 * total)][0] == pytest.approx(1.5)
    assert [triangle(s, total) for s in (0, 23, total)] == pytest.approx([0.2, 1.0, 0.07])
    assert all(r[2] == pytest.approx(64 * r[0]) for r in rates)  # the scale holds all along
    resumed = build_scheduler(cfg, opt, steps, done_steps=steps)  # a resumed run: same rates
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(rates[steps])
    assert resumed.last_epoch == steps


def test_lookahead_moves_towards_the_fast_weights_every_n_steps() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    slow = {k: v.clone() for k, v in net.state_dict().items()}
    look = Lookahead(net, every=5, decay=0.9, total_steps=20)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
        net[1].num_batches_tracked.add_(7)
    fast = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(4):
        look.step()
    assert all(torch.equal(v, fast[k]) for k, v in net.state_dict().items())  # not yet
    look.step()  # step 5 of 20: rho = 0.9**5 * (5 / 20)**3
    rho = 0.9**5 * (5 / 20) ** 3
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, fast[key])  # integer counters are not averaged
        else:
            assert torch.allclose(value, rho * slow[key] + (1 - rho) * fast[key]), key
    assert look.rho() == pytest.approx(rho)
    look.steps = 20
    assert look.rho() == pytest.approx(0.9**5)  # full strength at the end of the run


def test_frozen_parameters_are_not_updated_but_the_rest_is() -> None:
    from cnnray.train.epoch import train_epoch

    torch.manual_seed(0)
    model = build_model("airbench", **SMALL)
    cfg = TrainConfig(model="airbench", dataset="cifar10", norm="batch", lr=0.5, schedule="constant")
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    sched = build_scheduler(cfg, opt, 2)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_epoch(model, batches, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), False,
                frozen=[model.whiten.bias])
    after = model.state_dict()
    assert torch.equal(after["whiten.bias"], before["whiten.bias"])
    assert not torch.equal(after["head.weight"], before["head.weight"])
    train_epoch(model, batches, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), False)
    assert not torch.equal(model.state_dict()["whiten.bias"], before["whiten.bias"])
