"""Swept fields that would change nothing: refused before any trial starts.

A field the rest of the configuration never reads makes every trial identical in that
field, so a sweep over it spends its budget on copies (and its table suggests the field
was tried). The rules below are read off what the code does with each field
(cnnray.train.optim, cnnray.train.loop, cnnray.train.worker_data, cnnray.models):

- `nesterov`: AdamW has no Nesterov switch (build_optimizer passes it to SGD only), and
  SGD applies it only with momentum > 0 (`nesterov and momentum > 0`).
- `warmup_epochs`: read by the cosine and constant schedules only; onecycle and triangle
  carry their own warm-up (optim._schedule).
- `lookahead_decay`: read only when lookahead_every > 0 (Lookahead is off at 0).
- `norm_lr_scale`: scales the parameters of norm layers; a model built without any
  (norm none) has none to scale (optim.param_groups).
- `crop_padding`: the size of random crops; no crops are made when augment resolves to
  none (augment none, or auto on the one-channel digit datasets: resolve_augment).
- `lr_scaling`: "linear" multiplies lr by batch_size / 128 (LR_REFERENCE_BATCH), which
  is 1 when every trial's batch is 128.
- `whiten_bias_epochs`: freezes the whitening bias from that epoch on; every value at or
  past `epochs` freezes nothing, the same as none (the loop's `epoch >= ...` test).
- Fields that change the speed, not what is learned (channels_last, compile,
  data_loader, local_mode, test_at_end, min_workers, elastic_resize_s): refused always.

Fields with an effect under every configuration are not listed: `momentum` is SGD's
momentum and AdamW's beta1 (build_optimizer), and `weight_decay` applies to the conv and
linear weights of every model under both optimizers (param_groups), so neither can be
inert here. `amp` is left sweepable: whether bf16 is native is a property of the
workers' hardware, which the driver does not see.

A swept field is refused only when it has no effect in *every* combination the check
builds (check_space's combinations): `warmup_epochs` swept together with
`schedule: {choice: [onecycle, cosine]}` matters in the cosine trials, and is kept.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from cnnray.config import LR_REFERENCE_BATCH, ConfigError, TrainConfig

# Fields that change how fast a run goes, never its result.
SPEED_ONLY = frozenset(
    {"channels_last", "compile", "data_loader", "local_mode", "test_at_end", "min_workers", "elastic_resize_s"}
)
ONE_CHANNEL_DATASETS = ("mnist", "fashion_mnist")  # resolve_augment's "auto" is none for these


def _nesterov(cfg: TrainConfig) -> str | None:
    if cfg.optimizer == "adamw":
        return "optimizer adamw has no Nesterov switch (only sgd reads nesterov)"
    if cfg.momentum == 0:
        return "SGD without momentum (momentum 0) has no Nesterov step"
    return None


def _warmup(cfg: TrainConfig) -> str | None:
    if cfg.schedule in ("onecycle", "triangle"):
        return f"schedule {cfg.schedule} has its own warm-up (only cosine and constant read warmup_epochs)"
    return None


def _lookahead_decay(cfg: TrainConfig) -> str | None:
    return "lookahead is off (lookahead_every 0)" if cfg.lookahead_every == 0 else None


def _norm_lr_scale(cfg: TrainConfig) -> str | None:
    return None if has_norm_layers(cfg.model, cfg.norm) else f"model {cfg.model!r} with norm {cfg.norm!r} has no norm layers to scale"


def _crop_padding(cfg: TrainConfig) -> str | None:
    if cfg.augment == "none":
        return "augment none makes no crops"
    if cfg.augment == "auto" and cfg.dataset in ONE_CHANNEL_DATASETS:
        return f"augment auto makes no crops on {cfg.dataset} (one channel: no augmentation)"
    return None


def _lr_scaling(cfg: TrainConfig) -> str | None:
    if cfg.batch_size == LR_REFERENCE_BATCH:
        return f"linear scaling multiplies lr by batch_size/{LR_REFERENCE_BATCH} = 1 at batch_size {cfg.batch_size}"
    return None


def _whiten_bias_epochs(cfg: TrainConfig) -> str | None:
    if cfg.whiten_bias_epochs is None or cfg.whiten_bias_epochs >= cfg.epochs:
        return f"a value at or past epochs={cfg.epochs} freezes nothing, like none"
    return None


# Field -> rule: the reason it changes nothing under `cfg` (a trial's whole config), or None.
INERT_RULES: dict[str, Callable[[TrainConfig], str | None]] = {
    "nesterov": _nesterov,
    "warmup_epochs": _warmup,
    "lookahead_decay": _lookahead_decay,
    "norm_lr_scale": _norm_lr_scale,
    "crop_padding": _crop_padding,
    "lr_scaling": _lr_scaling,
    "whiten_bias_epochs": _whiten_bias_epochs,
}


def has_norm_layers(model: str, norm: str) -> bool:
    """Whether `model` built with `norm` holds any norm layer (on the meta device: shapes
    only). Some models keep a norm whatever `norm` says, so the net is inspected."""
    import torch

    from cnnray.models import get_model_spec, resolve_model_args
    from cnnray.train.optim import NORM_TYPES

    with torch.device("meta"):
        net = get_model_spec(model).fn(**resolve_model_args(model, norm=norm))
    return any(isinstance(m, NORM_TYPES) for m in net.modules())


def inert_reason(key: str, cfg: TrainConfig) -> str | None:
    """Why field `key` changes nothing in a run of `cfg`, or None when it matters."""
    if key in SPEED_ONLY:
        return "it changes the speed of a run, not what it learns"
    rule = INERT_RULES.get(key)
    return rule(cfg) if rule else None


def check_effects(space: Mapping[str, Any], configs: list[tuple[dict[str, Any], TrainConfig]]) -> None:
    """ConfigError (one line) for the first swept field of `space` that changes nothing in
    every trial config of `configs` ((swept values, the trial's TrainConfig) pairs)."""
    for key in space:
        reasons = [inert_reason(key, cfg) for _, cfg in configs]
        if configs and all(reasons):
            raise ConfigError(f"{key} has no effect in any trial: {reasons[0]}; drop it from the space or change what makes it inert")
