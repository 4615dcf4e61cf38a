"""What the worker's hardware decides: bf16 where it is native, channels-last where it pays
off, torch's threads. Probed once per process."""

from __future__ import annotations

import contextlib
import functools

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run natively: CUDA GPUs with bf16, and CPUs with
    AVX512-BF16 or AMX (there bf16 + channels-last trains the lecture CNN ~2.7x faster
    per core than fp32). Elsewhere bf16 is emulated and slower, so it stays off."""
    return _native_bf16(str(device))


@functools.cache  # the hardware does not change: probe once, not on every training batch
def _native_bf16(device_name: str) -> bool:
    device = torch.device(device_name)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu exposes these probes only as private helpers; absent means "no".
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def use_channels_last(enabled: bool, device: torch.device) -> bool:
    """NHWC pays off with cuDNN and with oneDNN's bf16 kernels; plain fp32 CPU gains little."""
    return enabled and (device.type == "cuda" or native_bf16(device))


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the training step where the hardware runs bf16 natively (no loss
    scaling needed: bf16 has fp32's exponent range); a no-op elsewhere."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_torch(device: torch.device, cpus: int | None) -> None:
    """Torch's settings for a worker on `device` with `cpus` reserved CPUs."""
    if device.type == "cpu":
        # One intra-op thread per reserved CPU: more threads than cores only thrash.
        torch.set_num_threads(cpus or 1)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
