"""The check every export passes: the exported file's logits against the checkpoint's own.

Tolerance. The file and cnnray compute the same fp32 function with different kernels
(ONNX Runtime's MLAS against PyTorch's oneDNN, NCHW against channels-last), so sums are
reassociated and logits differ in their last bits. Measured on the 2-core CI machine over
every registered model (untrained, both TTA modes "none" and "flip_translate", 16 random
images of pixels 0..255): the largest |ONNX Runtime - PyTorch| was 1.3e-6 at logits of
magnitude 0.65 (vgg13), at most 2.0e-6 of the largest |logit| of a batch for any model;
torch.export's program gave 0.0 (the same kernels). A trained MNIST cnn (one epoch on 2,000
images, largest |logit| 4.4) gave 1.4e-6 on 512 test images in ONNX Runtime, 9.5e-7 as .pt2
(3e-7 of its scale). LOGIT_RTOL = 1e-4 of the batch's largest |logit| (floor 1.0) leaves a
margin of ~50x over the worst reassociation seen, and is still far below what a wrong
graph gives (a missing normalisation or TTA view moves logits by 1e-2..1e+1).
Predictions (argmax) must agree on every image, whatever the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGIT_RTOL = 1e-4  # of max(1, largest |logit| of the batch): see the module docstring


@dataclass(frozen=True)
class Comparison:
    """The exported file's logits against the checkpoint's on one sample of images."""

    images: int
    max_abs_diff: float  # largest |file - checkpoint| logit
    tolerance: float  # the bound max_abs_diff must stay within
    mismatched: int  # images whose predicted class differs

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.mismatched == 0

    def describe(self) -> str:
        return (f"{self.images} images: largest logit difference {self.max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.2e}), {self.mismatched} predictions differ")


def compare(reference: torch.Tensor, exported: torch.Tensor) -> Comparison:
    """N x K logits of the checkpoint (`reference`) and of the file -> Comparison."""
    ref, got = reference.float(), torch.as_tensor(exported).float()
    if ref.shape != got.shape:
        raise ValueError(f"the exported file gives logits of shape {list(got.shape)}, the checkpoint {list(ref.shape)}")
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    diff = float((ref - got).abs().max()) if ref.numel() else 0.0
    if diff != diff:  # NaN: never within tolerance
        diff = float("inf")
    return Comparison(len(ref), diff, LOGIT_RTOL * scale, int((ref.argmax(1) != got.argmax(1)).sum()))
