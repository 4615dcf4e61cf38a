"""What a run's sizes allow, checked before Ray starts: the one place that refuses sizes that
cannot train (ConfigError, one line naming the flags and a fix), used by `cnnray train`
(driver.preflight), every point of a `cnnray tune` space (driver.preflight's `variants`), the
job wrappers (they run the CLI) and, for a cluster's data that only they see, the workers.

The sizes come from the data without decoding it where possible (`nominal_sizes`: the
registry datasets' published counts, an image folder's listing and its first image), then
again from the loaded dataset. Refused:

- an empty validation or test split, or fewer training examples than one batch per worker
  (take_subset, split_train_val: round(N * val_fraction) held out, shard_indices: N //
  workers each; the training loaders drop the last partial batch, so that batch never
  reaches a norm layer with one example);
- images too small for the model's convolutions and pools (its constructor refuses them);
- batch norm with one value per channel in a training batch: BatchNorm1d/2d raise
  "Expected more than 1 value per channel when training" when batch x H x W = 1 at a layer
  (per worker: `batch_size` is the global batch, split over the workers), found by a forward
  pass in training mode on the meta device (shapes only), whatever `norm` says (some models
  keep batch norm);
- schedules that cannot run in the run's steps (onecycle of 1 or 4 steps), a warm-up as
  long as the run.

And `few_steps_warning` says when a run that can train has too few optimizer steps to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnray.config import FEW_STEPS, ConfigError, TrainConfig

# The registry datasets' published sizes (train, test, C x H x W): enough to check a run
# before anything is downloaded or decoded. The loaded dataset is checked again.
NOMINAL = {
    "mnist": (60_000, 10_000, (1, 28, 28)),
    "fashion_mnist": (60_000, 10_000, (1, 28, 28)),
    "cifar10": (50_000, 10_000, (3, 32, 32)),
}
# OneCycleLR (pct_start 0.25) ends its warm-up at step 0.25 * total - 1: at 4 steps that is
# step 0, where torch divides by zero; at 1 step the one rate is max_lr / 25 / 1e4 (~0, the
# run learns nothing). 2 and 3 steps run (without a warm-up); the too-few-steps warning
# speaks for them. Every other schedule runs at any length (check_schedule).
ONECYCLE_IMPOSSIBLE = {1: "its only step has a learning rate of ~0 (the cycle's end)",
                       4: "PyTorch's OneCycleLR divides by zero when its 25% warm-up ends at step 0"}


@dataclass(frozen=True)
class DataSizes:
    """A dataset's sizes before subset and split: what the checks need of the data."""

    name: str
    n_train: int  # training examples (validation is held out of these)
    n_test: int
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int = 10


@dataclass(frozen=True)
class Plan:
    """The optimizer steps a run takes (the fewest, for an elastic run)."""

    steps_per_epoch: int
    total_steps: int


def nominal_sizes(cfg: TrainConfig) -> DataSizes | None:
    """Sizes without decoding: the registry's for MNIST, Fashion-MNIST and CIFAR-10; an image
    folder's listing (file names only) and its first image. None when the data cannot be
    listed from here (the loader then says why, or a cluster's workers check it)."""
    if cfg.dataset in NOMINAL:
        n_train, n_test, shape = NOMINAL[cfg.dataset]
        return DataSizes(cfg.dataset, n_train, n_test, shape)
    from cnnray.data import DataError
    from cnnray.data.decode import DecodeError, decode_image
    from cnnray.data.sources import list_source, source_uri

    try:
        listing = list_source(source_uri(cfg.dataset, cfg.data_dir))
    except DataError:
        if cfg.data_loader == "ray-data":  # no other loader will read it: say why now
            raise
        return None  # the in-memory loader says why (or downloads what it can)
    try:
        c, h, w = decode_image(listing.first_train).shape
    except (DecodeError, OSError, ValueError):  # the decode pass names the file later
        return None
    classes = {item.cls for item in listing.train}
    return DataSizes(cfg.dataset, len(listing.train), len(listing.test), (int(c), int(h), int(w)), len(classes))


def split_counts(cfg: TrainConfig, n_train_total: int, n_test_total: int) -> tuple[int, int, int]:
    """(train, validation, test) sizes: take_subset, then round(N * val_fraction) held out."""
    n = n_train_total if cfg.subset is None else min(cfg.subset, n_train_total)
    n_val = int(round(n * cfg.val_fraction))
    n_test = n_test_total if cfg.subset is None else min(cfg.subset, n_test_total)
    return n - n_val, n_val, n_test


def world_sizes(cfg: TrainConfig) -> range:
    """Every worker count the run may train with (an elastic run's whole range)."""
    return range(cfg.min_workers or cfg.workers, cfg.workers + 1)


def check_split_counts(cfg: TrainConfig, n_train_total: int, n_test_total: int, name: str) -> Plan:
    """Refuse (ConfigError) what the split sizes alone make impossible: an empty validation
    or test split, no full training batch per worker, a schedule too short for its shape.
    Returns the run's Plan."""
    n_train, n_val, n_test = split_counts(cfg, n_train_total, n_test_total)
    n = n_train + n_val
    if n_val == 0:
        raise ConfigError(
            f"the validation split is empty ({n} training examples x val_fraction {cfg.val_fraction:g} "
            "rounds to 0): raise --val-fraction or --subset"
        )
    for world in world_sizes(cfg):
        per_worker = cfg.batch_size // world
        if n_train // world < per_worker:
            raise ConfigError(
                f"{n_train} training examples over {world} worker(s) give no full batch of {per_worker} "
                "per worker: use a larger --subset, fewer --workers or a smaller --batch-size"
            )
    if cfg.test_at_end and n_test == 0:
        raise ConfigError(f"the {name} dataset has no test examples to evaluate the best checkpoint on")
    plan = plan_steps(cfg, n_train)
    check_schedule(cfg, plan)
    return plan


def plan_steps(cfg: TrainConfig, n_train: int) -> Plan:
    """Optimizer steps per epoch (each worker's n_train // world examples in full batches of
    batch_size // world: the loaders drop the rest) and in the run; the fewest over an
    elastic range."""
    per_epoch = min((n_train // world) // max(1, cfg.batch_size // world) for world in world_sizes(cfg))
    return Plan(per_epoch, per_epoch * cfg.epochs)


def check_schedule(cfg: TrainConfig, plan: Plan) -> None:
    """ConfigError when the schedule cannot run in `plan.total_steps` steps (onecycle: 1 or
    4, ONECYCLE_IMPOSSIBLE), or its warm-up (cosine, constant) would fill the run."""
    steps = f"{plan.total_steps} optimizer step(s) ({cfg.epochs} epoch(s) x {plan.steps_per_epoch} per epoch)"
    fix = "raise --epochs or --subset, or lower --batch-size"
    if cfg.schedule == "onecycle" and plan.total_steps in ONECYCLE_IMPOSSIBLE:
        raise ConfigError(f"--schedule onecycle cannot run {steps}: {ONECYCLE_IMPOSSIBLE[plan.total_steps]}; "
                          f"{fix}, or use --schedule constant")
    warmup = int(round(cfg.warmup_epochs * plan.steps_per_epoch))
    if cfg.schedule in ("cosine", "constant") and cfg.warmup_epochs > 0 and warmup >= plan.total_steps:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs:g} is {warmup} step(s), the whole run of {steps}: "
                          f"lower --warmup-epochs below {cfg.epochs}, or {fix}")


def check_model_input(cfg: TrainConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """ConfigError when the model cannot take images of `input_shape`, or when one of its
    batch-norm layers would see a single value per channel in a training batch of
    batch_size // workers (a forward pass in training mode on the meta device: no memory)."""
    import torch

    from cnnray.models import get_model_spec, resolve_model_args

    c, h, w = input_shape
    try:
        args = resolve_model_args(cfg.model, num_classes=num_classes, in_channels=c, image_size=[h, w], norm=cfg.norm,
                                  hidden_sizes=list(cfg.hidden_sizes) if cfg.hidden_sizes else None)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model {cfg.model!r} cannot take the {cfg.dataset} images ({c}x{h}x{w}): {e}") from None
    per_worker = cfg.batch_size // cfg.workers  # the smallest of an elastic range
    if per_worker > 1:  # B x H x W > 1 at every layer: nothing can fail
        return
    with torch.device("meta"):
        net = get_model_spec(cfg.model).fn(**args).train()
        try:
            net(torch.zeros(per_worker, c, h, w))
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            raise ConfigError(
                f"--batch-size {cfg.batch_size} over {cfg.workers} worker(s) is {per_worker} image per worker, and "
                f"{cfg.model}'s batch norm needs more than one value per channel in training: use --batch-size "
                f"{2 * cfg.workers} or more, or --norm group or layer"
            ) from None


def check_sizes(cfg: TrainConfig, sizes: DataSizes) -> Plan:
    """Every size check of a run of `cfg` on data of `sizes`: the splits, the schedule and the
    model's input (ConfigError). Returns the run's Plan."""
    plan = check_split_counts(cfg, sizes.n_train, sizes.n_test, sizes.name)
    check_model_input(cfg, sizes.input_shape, sizes.num_classes)
    return plan


def few_steps_warning(cfg: TrainConfig, plan: Plan) -> str | None:
    """One line when the run takes fewer than FEW_STEPS optimizer steps (its result is then
    unreliable: see config.FEW_STEPS), saying what to change; None otherwise."""
    if plan.total_steps >= FEW_STEPS:
        return None
    want_epochs = -(-FEW_STEPS // max(1, plan.steps_per_epoch))
    return (
        f"[cnnray] warning: only {plan.total_steps} optimizer steps ({cfg.epochs} epoch(s) x "
        f"{plan.steps_per_epoch} per epoch at global batch {cfg.batch_size}); runs of under {FEW_STEPS} steps "
        f"often end far below what the model can learn, or at chance: use --epochs {want_epochs} or more, "
        "or a smaller --batch-size"
    )


def missing_classes_warning(cfg: TrainConfig, labels, classes) -> str | None:  # noqa: ANN001 (a label tensor, names)
    """One line naming the classes with no training example once --subset and the
    validation split are drawn (take_subset, split_train_val: the workers draw the same);
    the run can train, but never learns to predict them. None when every class has one."""
    from cnnray.data import split_train_val, take_subset

    subset, _ = take_subset(labels, labels, cfg.subset, cfg.seed)  # labels stand in for images: same draw
    train, _, _, _ = split_train_val(subset, subset, cfg.val_fraction, cfg.seed)
    missing = sorted(set(range(len(classes))) - set(train.tolist()))
    if not missing:
        return None
    names = ", ".join(str(classes[i]) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (f"[cnnray] warning: {len(missing)} of {len(classes)} classes have no training example after --subset "
            f"{cfg.subset} and --val-fraction {cfg.val_fraction:g} ({names}): the model cannot learn them; "
            "use a larger --subset")
