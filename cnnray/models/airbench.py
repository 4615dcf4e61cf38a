"""`airbench`: the fast CIFAR-10 network of Keller Jordan's airbench94.

Source: K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv 2404.00498
(2024), section 3 and its released code (github KellerJordan/cifar10-airbench); written
anew for cnnray, no code copied. The network (about 1.97M parameters at the paper's widths):

    whiten   conv 2x2, no padding, 2 * C * 2 * 2 = 24 filters (patch whitening), GELU
    block1   conv 3x3 -> max-pool 2 -> norm -> GELU -> conv 3x3 -> norm -> GELU   (64)
    block2   the same                                                            (256)
    block3   the same                                                            (256)
    head     global max-pool -> linear (no bias) -> x logit_scale (1/9)

On 32x32 inputs the maps are 31 -> 15 -> 7 -> 3 pixels wide; the head's pool takes the
max over whatever is left, so other sizes work too.

Choices from the paper, with their reasons:
- The stem's weights are set from the training images (`init_whitening`) and never
  trained: eigenvectors of the 2x2 patch covariance scaled by 1/sqrt(eigenvalue), and
  their negatives (so that the GELU after it loses no information). Its bias is trained
  (the training loop may freeze it after a few epochs: TrainConfig.whiten_bias_epochs).
- Every 3x3 conv starts as an identity on its first `in_channels` filters (Dirac init),
  "an implicit residual" that lets a plain 7-conv stack train fast without skips.
- The norm layers keep their scale fixed at 1 (not trained): after a norm the network is
  invariant to the scale of the conv weights, so a learned scale only adds noise.
  Batch norm uses momentum 0.4 (PyTorch's convention: running = 0.6 * running + 0.4 *
  batch) and eps 1e-12, the paper's values for a run of only ~500 steps.
- logits = 1/9 * linear(features): a fixed temperature that the paper tuned together
  with label smoothing 0.2.

Norms: "batch" (default, the paper's), "group" and "layer" (batch-size independent).
"none" is refused: the recipe's large learning rate relies on the scale invariance a
norm gives, and without one the un-normalised 7-conv stack diverges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnray.models.layers import as_image_size, make_norm, require_min_size
from cnnray.models.registry import register_model

# The norms this network can use: every norm of cnnray except "none" (see the docstring).
AIRBENCH_NORMS = ("batch", "group", "layer")
# Batch-norm settings of the paper: momentum 0.4 in PyTorch's convention, tiny eps.
BN_MOMENTUM = 0.4
BN_EPS = 1e-12
WHITEN_KERNEL = 2  # pixels: the stem looks at 2x2 patches
# Added to the patch covariance's eigenvalues before 1/sqrt: keeps the near-zero ones
# (JPEG-smoothed patches) from being blown up into noise. The paper's value, for inputs
# normalised to unit variance per channel.
WHITEN_EPS = 5e-4


def _norm(norm: str, channels: int) -> nn.Module:
    layer = make_norm(norm, channels)
    if layer is None:  # resolve_model_args refuses "none" first; direct callers get this
        raise ValueError(f"airbench needs a norm layer; choose one of: {', '.join(AIRBENCH_NORMS)}")
    if isinstance(layer, nn.BatchNorm2d):
        layer.momentum, layer.eps = BN_MOMENTUM, BN_EPS
    layer.weight.requires_grad_(False)  # scale fixed at 1 (see the module docstring)
    return layer


def _identity_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 'same' conv without bias (a norm follows), Dirac-initialised on its first
    min(in, out) filters and PyTorch's default (Kaiming-uniform) elsewhere."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        n = min(in_channels, out_channels)
        nn.init.dirac_(conv.weight[:n])
    return conv


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> norm -> GELU -> conv -> norm -> GELU; halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _identity_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = _identity_conv(out_channels, out_channels)
        self.norm2 = _norm(norm, out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """airbench94's network (Jordan 2024): input N x C x H x W (normalised), output
    N x num_classes logits. `widths` are the three groups' channel counts."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
        norm: str = "batch",
        widths: tuple[int, int, int] = (64, 256, 256),
        logit_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        height, width = as_image_size(image_size)
        # 2x2 stem (-1 pixel), then three pools of 2 must leave at least 1 pixel: 16 - 1 = 15
        # -> 7 -> 3 -> 1.
        require_min_size("airbench", (height, width), 2**3 + WHITEN_KERNEL - 1)
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"airbench widths must be three positive channel counts, got {widths!r}")
        w1, w2, w3 = (int(w) for w in widths)
        self.logit_scale = float(logit_scale)
        whiten_width = 2 * in_channels * WHITEN_KERNEL**2  # each eigenvector and its negative
        self.whiten = nn.Conv2d(in_channels, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never trained
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        self.block1 = ConvGroup(whiten_width, w1, norm)
        self.block2 = ConvGroup(w1, w2, norm)
        self.block3 = ConvGroup(w2, w3, norm)
        self.head = nn.Linear(w3, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.amax(x, dim=(2, 3))  # global max-pool: N x w3
        return self.head(x) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the stem's weights so that its outputs are whitened patches.

        images: N x C x H x W float, normalised as the network's inputs. Every 2x2 patch
        (stride 1) is a vector of C*4 values; with its covariance S = V diag(l) V^T (the
        mean is not removed, as in the paper: the normalised data is near zero-mean), the
        filters are the rows of diag(1 / sqrt(l + eps)) V^T and their negatives, so the
        first C*4 outputs of a patch p are V^T p / sqrt(l + eps): covariance ~identity.
        Source: Jordan 2024 (arXiv 2404.00498), section 3.2. The bias is left as it is.
        Raises ValueError for a batch of the wrong channel count or smaller than a patch.
        """
        c = self.whiten.in_channels
        k = WHITEN_KERNEL
        if images.ndim != 4 or images.shape[1] != c or min(images.shape[2:]) < k:
            raise ValueError(f"init_whitening needs N x {c} x H x W images with H, W >= {k}, got {tuple(images.shape)}")
        # N x (C*k*k) x L patches, as the conv sees them (channel-major, then row, column).
        patches = F.unfold(images.float(), kernel_size=k).transpose(1, 2).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())  # ascending
        # Largest eigenvalue first (the paper's order; any order whitens equally).
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).float()
        filters = filters.reshape(c * k * k, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))


@register_model(
    "airbench",
    in_channels=3,
    image_size=(32, 32),
    description="airbench94 (Jordan 2024): whitened 2x2 stem, conv groups 64/256/256, GELU",
    norms=AIRBENCH_NORMS,
    default_norm="batch",
)
def airbench(
    *,
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    norm: str,
    widths: tuple[int, int, int] = (64, 256, 256),
) -> Airbench:
    return Airbench(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, norm=norm, widths=tuple(widths)
    )
