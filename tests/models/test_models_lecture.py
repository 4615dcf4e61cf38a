"""The lecture's numbers: pooling before the ReLU equals the lecture's order, the tutorial
CNN's forward, parameter counts, attribute names, and VGG19's layer table (the one 224x224
forward pass of the model tests)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnray.models import LayerRow, build_model, count_parameters, format_layer_table, get_model_spec, layer_table
from tests.helpers.models import state_shapes, values_and_grads


# --- the lecture's numbers ------------------------------------------------------------


def _in_lecture_order(model: nn.Module) -> nn.Module:
    """A copy with every Sequential's (MaxPool2d, ReLU) pair put back as the lecture
    writes it, ReLU then pool: the models pool first because it is cheaper."""
    twin = copy.deepcopy(model)
    for seq in twin.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq)
            for i in range(len(mods) - 1):
                if isinstance(mods[i], nn.MaxPool2d) and isinstance(mods[i + 1], nn.ReLU):
                    mods[i], mods[i + 1] = mods[i + 1], mods[i]
            for i, mod in enumerate(mods):
                seq[i] = mod
    return twin


@pytest.mark.parametrize("name", ["cnn", "vgg11", "vgg16"])
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_pool_before_relu_equals_the_lecture_order(name: str, norm: str) -> None:
    torch.manual_seed(0)
    spec = get_model_spec(name)
    model = build_model(name, norm=norm)
    lecture = _in_lecture_order(model)
    assert [type(m) for m in lecture.modules()] != [type(m) for m in model.modules()]
    x = torch.randn(4, spec.in_channels, *spec.image_size)
    out, grads = values_and_grads(model, x)
    ref_out, ref_grads = values_and_grads(lecture, x)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_tutorial_cnn_equals_the_lecture_forward() -> None:
    torch.manual_seed(0)
    m = build_model("tutorial_cnn")
    x = torch.randn(4, 3, 32, 32)

    def lecture_forward(x: torch.Tensor) -> torch.Tensor:  # the PyTorch tutorial's forward
        x = m.pool(F.relu(m.conv1(x)))
        x = m.pool(F.relu(m.conv2(x)))
        x = torch.flatten(x, 1)
        return m.fc3(F.relu(m.fc2(F.relu(m.fc1(x)))))

    with torch.no_grad():
        assert torch.equal(m(x), lecture_forward(x))


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("cnn", {}, 28_938),
        ("tutorial_cnn", {}, 62_006),
        ("lenet5", {"image_size": 32}, 61_706),
        ("lenet5", {}, 61_706),  # 28x28 is padded in C1, so the same network
        ("vgg19_imagenet", {}, 143_667_240),
        ("resnet18", {"norm": "batch"}, 11_173_962),
    ],
)
def test_parameter_counts(name: str, kwargs: dict, expected: int) -> None:
    with torch.device("meta"):
        assert count_parameters(build_model(name, **kwargs)) == expected


def test_lecture_cnns_keep_their_attribute_names() -> None:
    with torch.device("meta"):
        cnn = build_model("cnn")
        tutorial = build_model("tutorial_cnn")
    assert state_shapes(cnn) == {
        "conv1.0.weight": (16, 1, 5, 5),
        "conv1.0.bias": (16,),
        "conv2.0.weight": (32, 16, 5, 5),
        "conv2.0.bias": (32,),
        "out.weight": (10, 32 * 7 * 7),
        "out.bias": (10,),
    }
    assert [key for key in state_shapes(tutorial) if key.endswith("weight")] == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
    ]
    assert state_shapes(tutorial)["fc1.weight"] == (120, 16 * 5 * 5)


# (kind, output shape, neurons, learned parameters), copied from the lecture's VGG19 table.
VGG19_TABLE = [
    ("Convolution", (64, 224, 224), 3_211_264, 1_792),
    ("Convolution", (64, 224, 224), 3_211_264, 36_928),
    ("Max-pooling", (64, 112, 112), 802_816, 0),
    ("Convolution", (128, 112, 112), 1_605_632, 73_856),
    ("Convolution", (128, 112, 112), 1_605_632, 147_584),
    ("Max-pooling", (128, 56, 56), 401_408, 0),
    ("Convolution", (256, 56, 56), 802_816, 295_168),
    ("Convolution", (256, 56, 56), 802_816, 590_080),
    ("Convolution", (256, 56, 56), 802_816, 590_080),
    ("Convolution", (256, 56, 56), 802_816, 590_080),
    ("Max-pooling", (256, 28, 28), 200_704, 0),
    ("Convolution", (512, 28, 28), 401_408, 1_180_160),
    ("Convolution", (512, 28, 28), 401_408, 2_359_808),
    ("Convolution", (512, 28, 28), 401_408, 2_359_808),
    ("Convolution", (512, 28, 28), 401_408, 2_359_808),
    ("Max-pooling", (512, 14, 14), 100_352, 0),
    ("Convolution", (512, 14, 14), 100_352, 2_359_808),
    ("Convolution", (512, 14, 14), 100_352, 2_359_808),
    ("Convolution", (512, 14, 14), 100_352, 2_359_808),
    ("Convolution", (512, 14, 14), 100_352, 2_359_808),
    ("Max-pooling", (512, 7, 7), 25_088, 0),
    ("Fully connected", (4_096,), 4_096, 102_764_544),
    ("Fully connected", (4_096,), 4_096, 16_781_312),
    ("Fully connected", (1_000,), 1_000, 4_097_000),
]
VGG19_TOTAL_NEURONS = 16_391_656  # the lecture's total: rows 1-24, the input not counted
VGG19_TOTAL_PARAMS = 143_667_240


def test_vgg19_table_matches_the_lecture() -> None:
    model = build_model("vgg19_imagenet")  # real weights: one real 224x224 forward pass
    model.train()
    rows = layer_table(model, (3, 224, 224))
    assert model.training, "layer_table must restore the training mode"
    assert [(r.kind, r.output_shape, r.neurons, r.params) for r in rows] == VGG19_TABLE
    assert [r.index for r in rows] == list(range(1, 25))
    assert sum(r.neurons for r in rows) == VGG19_TOTAL_NEURONS
    assert sum(r.params for r in rows) == VGG19_TOTAL_PARAMS == count_parameters(model)

    text = format_layer_table(rows, input_shape=(3, 224, 224))
    assert "Total: 16,391,656" in text and "Total: 143,667,240" in text
    assert "Flattening to a vector of length 25,088" in text
    lines = text.splitlines()
    assert lines[2].split()[:2] == ["0", "Input"]
    assert " ".join(lines[3].split()) == "1 Convolution 64 x 224 x 224 3,211,264 1,792"


def test_layer_row_is_frozen() -> None:
    row = LayerRow(index=1, kind="Convolution", output_shape=(6, 28, 28), neurons=4704, params=156)
    with pytest.raises(AttributeError):
        row.params = 0  # type: ignore[misc]
