"""The training benchmark's plain references: the lecture's model, and a short real run.

The benchmarks themselves are not part of the test run (they time things); these check
that what they compare against is what the README says it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.train_reference import LectureCNN, reference_throughput
from cnnray.models import build_model


def test_lecture_cnn_is_cnnrays_cnn_with_the_same_weights() -> None:
    """The verbatim lecture class and cnnray's `cnn` share state_dict keys and compute the
    same function, values and gradients (cnnray only pools before the ReLU)."""
    torch.manual_seed(0)
    lecture, ours = LectureCNN(), build_model("cnn")
    ours.load_state_dict(lecture.state_dict())  # strict: the same keys and shapes
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    out_l, out_o = lecture(x), ours(x)
    assert torch.equal(out_l, out_o)
    F.cross_entropy(out_l, y).backward()
    F.cross_entropy(out_o, y).backward()
    for (name, p), q in zip(lecture.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize(("model", "bf16"), [("lecture", False), ("cnnray", False), ("cnnray", True)])
def test_reference_throughput_runs_on_real_mnist(mnist_dir, model: str, bf16: bool) -> None:
    rate = reference_throughput(str(mnist_dir), batch_size=32, threads=1, seconds=0.2, model=model, bf16=bf16)
    assert rate > 100  # samples/s: far below any real figure, far above a broken loop's 0


def test_plain_loop_on_a_ray_train_worker_reports_its_rate(mnist_dir) -> None:
    """The throughput benchmark's third path: the same plain loop on a Ray Train worker of
    a private Ray (its own interpreter, as the benchmark runs it) hands back its rate."""
    import argparse

    from benchmarks.train_bench import _plain_on_ray_train_in_fresh_process

    a = argparse.Namespace(data_dir=str(mnist_dir), batch_size=32, seconds=0.2)
    assert _plain_on_ray_train_in_fresh_process(a, threads=1, bf16=False) > 100  # samples/s, as above
