"""The loop's collectives with 2 real gloo ranks (no Ray): every rank enters the same ones
whatever its shard sizes, and a divergence on one rank stops both with the same line.

Two spawned processes (a process group is per process) run both scenarios, one after the
other on the same group (each starts its own DDP model), and send back what they saw; the
two tests check their parts. A rank stuck in a collective fails by the group timeout.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import traceback

import pytest
import torch
from torch import nn

from cnnray.config import TrainConfig
from cnnray.train.epoch import EpochStats, train_epoch
from cnnray.train.collectives import divergence, validate
from cnnray.train.optim import build_optimizer, build_scheduler

GROUP_TIMEOUT_S = 20  # a rank left waiting in a collective raises after this


def _rank_main(rank: int, world: int, init_file: str, fn, queue) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        torch.set_num_threads(1)
        queue.put((rank, "ok", fn(rank, world)))
    except BaseException:  # noqa: BLE001 - sent to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, tmp_path, world: int = 2) -> list:
    """fn(rank, world) on `world` gloo ranks; their return values, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path / "pg-init"), fn, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=GROUP_TIMEOUT_S * 3 + 60)
            assert status == "ok", f"rank {rank} failed:\n{value}"
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _bn_model() -> nn.Module:
    from cnnray.models import build_model

    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=[28, 28], norm="batch")


def _batches(n: int, rank: int, world: int, batch_size: int, seed: int = 0):
    from cnnray.data import ShardedBatches

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ShardedBatches(x, y, batch_size=batch_size, rank=rank, world_size=world, shuffle=False,
                          drop_last=False, mean=[0.5], std=[0.25])


def _validate_with_an_empty_rank(rank: int, world: int):
    """Issue 13's hang: one validation example, so rank 1 has no validation batch, and a
    BatchNorm model whose DDP forward broadcasts buffers (rank 0 waited there forever)."""
    net = _bn_model()
    model = nn.parallel.DistributedDataParallel(net)
    cfg = TrainConfig(model="cnn", norm="batch", workers=2, batch_size=8, epochs=1)
    optimizer = build_optimizer(cfg, net, torch.device("cpu"))
    scheduler = build_scheduler(cfg, optimizer, 2)
    train = _batches(32, rank, world, 4, seed=rank + 1)
    train_epoch(model, [b for i, b in zip(range(2), train)], optimizer, scheduler, nn.CrossEntropyLoss(),
                torch.device("cpu"), amp=False)
    val = _batches(1, rank, world, 1024)
    assert len(val) == (1 if rank == 0 else 0)
    stats = validate(net, val, torch.device("cpu"))
    # Twice: the next epoch's validation meets the same collectives in the same order.
    stats2 = validate(net, val, torch.device("cpu"))
    running = [b.tolist() for b in net.buffers()]  # plain lists: tensors cannot outlive the child
    return stats.count, stats.loss, stats2.loss, running


def _both_scenarios(rank: int, world: int) -> dict:
    """Both scenarios on one pair of ranks: spawning a pair (each imports torch) is most
    of a scenario's cost. Validation first: a hang there fails both tests."""
    return {"empty_rank": _validate_with_an_empty_rank(rank, world), "diverge": _diverge_on_rank_1(rank, world)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_both_scenarios, tmp_path_factory.mktemp("pg"))


def test_validation_with_a_rank_that_has_no_batch_does_not_hang(two_ranks):
    (count0, loss0, again0, bufs0), (count1, loss1, again1, bufs1) = [r["empty_rank"] for r in two_ranks]
    assert count0 == count1 == 1  # all-reduced: the one example, seen by both ranks' stats
    assert loss0 == loss1 == again0 == again1
    # Both ranks evaluated rank 0's BatchNorm statistics, as the checkpoint holds them.
    assert bufs0 == bufs1


def _diverge_on_rank_1(rank: int, world: int):
    """Rank 1's loss becomes NaN at its second step; DDP spreads NaN gradients to rank 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = nn.parallel.DistributedDataParallel(net)
    cfg = TrainConfig(model="mlp", workers=2, batch_size=4, epochs=1, schedule="constant", lr=0.5)
    optimizer = build_optimizer(cfg, net, torch.device("cpu"))
    scheduler = build_scheduler(cfg, optimizer, 3)
    x = torch.ones(2, 4)
    batches = [(x, torch.zeros(2, dtype=torch.int64))] * 3
    if rank == 1:
        batches[1] = (torch.full((2, 4), float("nan")), torch.zeros(2, dtype=torch.int64))
    local = train_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cpu"), amp=False)
    return local.nonfinite_step, divergence(4, local, net, torch.device("cpu"))


def test_divergence_on_one_rank_stops_every_rank_with_the_same_line(two_ranks):
    (step0, line0), (step1, line1) = [r["diverge"] for r in two_ranks]
    assert step1 == 1 and step0 == 2  # rank 0 sees NaN one step later, after the all-reduce
    assert line0 == line1
    assert line0.startswith("training diverged in epoch 4: the training loss became non-finite at step 2 of 3, "
                            "learning rate 0.5;")


def test_divergence_in_one_process_names_the_step_and_rate():
    net = nn.Linear(2, 2)
    cfg = TrainConfig(model="mlp", epochs=1, batch_size=2, schedule="constant", lr=1.0)
    optimizer = build_optimizer(cfg, net, torch.device("cpu"))
    scheduler = build_scheduler(cfg, optimizer, 2)
    batches = [(torch.ones(2, 2), torch.zeros(2, dtype=torch.int64)),
               (torch.tensor([[float("inf"), 0.0]] * 2), torch.zeros(2, dtype=torch.int64))]
    local = train_epoch(net, batches, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cpu"), amp=False)
    line = divergence(1, local, net, torch.device("cpu"))
    assert line and "epoch 1" in line and "step 2 of 2" in line and "learning rate 1;" in line
    assert "\n" not in line
    # A sound epoch is not flagged.
    sound = nn.Linear(2, 2)
    assert divergence(1, EpochStats(1.0, 1, 2, step_lrs=(0.1,)), sound, torch.device("cpu")) is None


@pytest.mark.parametrize("bad_steps", [(), (2,), (1, 3)])
def test_epoch_stats_equal_the_per_step_sums(bad_steps):
    """train_epoch sums at the end of the epoch: the same loss sum (each step's mean loss
    times its batch size, a short last batch included), correct count, sample count and
    first non-finite step as adding them up after every step."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    cfg = TrainConfig(model="mlp", epochs=1, batch_size=5, schedule="constant", lr=0.1)
    optimizer = build_optimizer(cfg, net, torch.device("cpu"))
    scheduler = build_scheduler(cfg, optimizer, 5)
    sizes = (5, 5, 5, 5, 3)
    batches = [(torch.randn(n, 4), torch.randint(0, 3, (n,))) for n in sizes]
    for i in bad_steps:
        batches[i][0][0, 0] = float("nan")
    seen = []  # what each step's loss call saw: the per-step figures to add up

    class Recording(nn.CrossEntropyLoss):
        def forward(self, logits, y):
            loss = super().forward(logits, y)
            seen.append((loss.item(), int((logits.argmax(1) == y).sum()), len(y)))
            return loss

    got = train_epoch(net, batches, optimizer, scheduler, Recording(), torch.device("cpu"), amp=False)
    assert (got.count, got.correct) == (sum(sizes), sum(c for _, c, _ in seen))
    assert got.nonfinite_step == (min(bad_steps) if bad_steps else -1)
    if bad_steps:
        assert not math.isfinite(got.loss_sum)
    else:
        assert got.loss_sum == pytest.approx(sum(loss * n for loss, _, n in seen), rel=1e-6)
    assert got.step_lrs == (0.1,) * len(sizes)


def test_epoch_sums_name_the_first_non_finite_step():
    from cnnray.train.epoch import _epoch_sums

    labels = [torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0]), torch.tensor([2, 2])]
    preds = [torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0]), torch.tensor([2, 0])]
    losses = [torch.tensor(v) for v in (1.0, float("nan"), 2.0, float("inf"))]
    got = _epoch_sums(losses, preds, labels, torch.device("cpu"))
    assert (got.nonfinite_step, got.correct, got.count) == (1, 5, 7)
    finite = _epoch_sums([torch.tensor(v) for v in (1.0, 0.5, 2.0, 4.0)], preds, labels, torch.device("cpu"))
    assert (finite.nonfinite_step, finite.loss_sum) == (-1, 1.0 * 2 + 0.5 * 2 + 2.0 * 1 + 4.0 * 2)


def test_an_epoch_without_batches_reports_zeros():
    net = nn.Linear(4, 3)
    cfg = TrainConfig(model="mlp", epochs=1, batch_size=5, schedule="constant")
    optimizer = build_optimizer(cfg, net, torch.device("cpu"))
    got = train_epoch(net, [], optimizer, build_scheduler(cfg, optimizer, 1), nn.CrossEntropyLoss(),
                      torch.device("cpu"), amp=False)
    assert (got.loss_sum, got.correct, got.count, got.nonfinite_step, got.step_lrs) == (0.0, 0, 0, -1, ())


@pytest.mark.parametrize("schedule, warmup", [("onecycle", 0.0), ("cosine", 0.5), ("constant", 1.0)])
def test_resume_with_more_epochs_follows_the_new_totals_schedule(schedule, warmup):
    """Issue 13: a finished 1-epoch run resumed for 2 epochs failed with 'Tried to step 22
    times. The specified number of total steps is 21'. Now the resumed schedule is the
    one a 2-epoch run has at that step, and it runs to the new end."""
    steps = 21
    cfg1 = TrainConfig(model="mlp", epochs=1, schedule=schedule, warmup_epochs=warmup)
    cfg2 = cfg1.replace(epochs=2)

    def optimizer_for(cfg):
        return build_optimizer(cfg, nn.Linear(2, 2), torch.device("cpu"))

    # The first run: one epoch, its optimizer state saved as a checkpoint holds it.
    opt1 = optimizer_for(cfg1)
    sched1 = build_scheduler(cfg1, opt1, steps)
    for _ in range(steps):
        opt1.step()
        sched1.step()
    # The resumed run: that optimizer state, a 2-epoch config, one epoch done.
    opt2 = optimizer_for(cfg2)
    opt2.load_state_dict(opt1.state_dict())
    resumed = build_scheduler(cfg2, opt2, steps, done_steps=steps)
    fresh_opt = optimizer_for(cfg2)
    fresh = build_scheduler(cfg2, fresh_opt, steps)
    for _ in range(steps):
        fresh_opt.step()
        fresh.step()
    lrs = []
    for _ in range(steps):  # the whole second epoch: no "Tried to step" error
        assert opt2.param_groups[0]["lr"] == pytest.approx(fresh_opt.param_groups[0]["lr"])
        lrs.append(opt2.param_groups[0]["lr"])
        opt2.step()
        resumed.step()
        fresh_opt.step()
        fresh.step()
    if schedule != "constant":
        assert lrs[0] > lrs[-1]  # annealing over the new second half


def test_resume_with_the_same_epochs_matches_the_saved_scheduler():
    """After a worker failure (same config) the replayed schedule equals the saved one."""
    cfg = TrainConfig(model="mlp", epochs=3, schedule="cosine", warmup_epochs=0.5)
    opt = build_optimizer(cfg, nn.Linear(2, 2), torch.device("cpu"))
    saved = build_scheduler(cfg, opt, 10)
    for _ in range(10):
        opt.step()
        saved.step()
    opt2 = build_optimizer(cfg, nn.Linear(2, 2), torch.device("cpu"))
    opt2.load_state_dict(opt.state_dict())
    build_scheduler(cfg, opt2, 10, done_steps=10)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
