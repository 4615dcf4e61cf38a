"""The one image decoder (cnnray/data/decode.py): every row of the README's "Images" table.

Each variant is generated from known pixels (tests/helpers/images.py); the decoded tensor is compared with the
reference of what an image viewer shows. The same bytes give the same tensor through
training's image-folder reader, and a served prediction of each (the in-process HTTP app
over `LocalBackend`) equals the offline prediction of the decoded tensor.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.data.decode import (
    DECODER_ID,
    DecodeError,
    DecodeLimits,
    count_jpeg_scans,
    decode_image,
)
from tests.helpers.images import (
    GRAY,
    RGB,
    H,
    W,
    VARIANTS,
    assert_close,
    chw,
    encode,
    png_bytes,
    repeat_last_scan,
    variant,
)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_decodes_as_a_viewer_shows_it(name):
    data, ref, tol = variant(name)
    assert_close(decode_image(data), ref, tol)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_in_the_models_mode_and_size(name):
    """To one channel by Pillow's luma, to three by repetition, then Pillow's bilinear resize:
    the reference image put through the same two steps."""
    data, ref, tol = variant(name)
    reference = Image.fromarray(ref[0] if ref.shape[0] == 1 else ref.transpose(1, 2, 0))
    for channels, size in [(1, (28, 28)), (3, (32, 32)), (3, (ref.shape[1], ref.shape[2]))]:
        want = reference.convert("L" if channels == 1 else "RGB")
        if want.size != (size[1], size[0]):
            want = want.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        # a resize spreads a level of difference over neighbours: allow one more level
        assert_close(decode_image(data, channels, size), chw(np.asarray(want)), tol + (1 if tol else 0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_reads_each_variant_as_serving_does(name):
    from cnnray.data.imagefolder import ImageItem, decode_images

    data, _, _ = variant(name)
    items = [ImageItem("train", "a", "train/a/x", data=data), ImageItem("test", "a", "test/a/x", data=data)]
    arrays = decode_images(items, "variants")
    assert np.array_equal(arrays["train_x"][0], decode_image(data))


# --- the two examples ---------------------------------------------------------------------
def test_16bit_gray_digit_gives_its_8bit_twins_tensor():
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 250  # a stroke, on black as MNIST digits are
    eight = encode(Image.fromarray(digit), "PNG")
    sixteen = encode(Image.fromarray(digit.astype(np.uint16) * 257), "PNG")  # Pillow: mode I;16
    assert np.array_equal(decode_image(sixteen, 1, (28, 28)), decode_image(eight, 1, (28, 28)))
    assert np.array_equal(decode_image(sixteen)[0], digit)  # not a white square


def test_mpo_jpg_is_accepted_by_training_and_serving():
    from cnnray.data.imagefolder import ImageItem, decode_images
    from cnnray.serve.preprocess import decode_image as serve_decode

    data, ref, _ = variant("jpeg-mpo")
    served = serve_decode(data, [3, H, W], 10**6)
    items = [ImageItem("train", "a", "photo.jpg", data=data), ImageItem("test", "a", "t.jpg", data=data)]
    assert np.array_equal(served.numpy(), decode_images(items, "x")["train_x"][0])
    assert np.array_equal(served.numpy(), ref)


# --- refusals and budgets --------------------------------------------------------------------------
def test_truncated_files_are_refused_not_half_decoded():
    for name in ("png-rgb-8bit", "jpeg-baseline", "jpeg-progressive", "bmp-rgb"):
        data, _, _ = variant(name)
        with pytest.raises(DecodeError) as info:
            decode_image(data[: len(data) * 2 // 3])
        assert not info.value.too_costly and "cannot decode" in info.value.message, (name, info.value.message)


def test_jpeg_scans_are_counted_from_the_markers():
    img = Image.fromarray(RGB)
    assert count_jpeg_scans(encode(img, "JPEG")) == 1
    assert count_jpeg_scans(encode(img, "JPEG", progressive=True)) == 10  # libjpeg's colour script
    assert count_jpeg_scans(encode(Image.fromarray(GRAY), "JPEG", progressive=True)) == 6
    # SOS bytes inside a comment segment are not scans
    assert count_jpeg_scans(encode(img, "JPEG", comment=b"\xff\xda\x00\x08\xff\xda")) == 1
    # an MPO counts only its first image's scans
    assert count_jpeg_scans(variant("jpeg-mpo")[0]) == 1
    attack = repeat_last_scan(encode(img, "JPEG", progressive=True), 5600)
    assert count_jpeg_scans(attack) == 5610
    assert count_jpeg_scans(attack, stop_after=100) == 101


def test_many_scan_progressive_jpeg_is_refused_before_decoding(monkeypatch):
    # The issue-12 attack's shape: one tiny scan repeated thousands of times.
    attack = repeat_last_scan(encode(Image.fromarray(RGB), "JPEG", progressive=True), 5600)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an over-budget JPEG"))
    with pytest.raises(DecodeError) as info:
        decode_image(attack)
    assert info.value.too_costly and "in more than 100 progressive scans" in info.value.message


def test_scan_budget_shrinks_as_the_canvas_grows():
    """scans x pixels is bounded: an image at the pixel limit gets 20 scans, smaller ones more."""
    limits = DecodeLimits(max_pixels=64 * 64)
    assert [limits.jpeg_scan_limit(p) for p in (64 * 64, 32 * 32, 8 * 8, 10**9)] == [20, 80, 100, 1]
    for side, ok in ((32, True), (64, False)):
        data = repeat_last_scan(encode(Image.new("RGB", (side, side), (9, 99, 199)), "JPEG", progressive=True), 20)
        assert count_jpeg_scans(data) == 30
        if ok:
            assert decode_image(data, limits=limits).shape == (3, side, side)
        else:
            with pytest.raises(DecodeError, match="64x64 pixels in more than 20 progressive scans"):
                decode_image(data, limits=limits)


@pytest.mark.parametrize("limits, data, fragment", [
    (DecodeLimits(max_pixels=1000), encode(Image.new("L", (40, 30)), "PNG"), "larger than the limit of 1000"),
    (DecodeLimits(max_frames=2), encode(Image.new("L", (8, 8)), "PNG", save_all=True,
                                        append_images=[Image.new("L", (8, 8), i) for i in (1, 2)]),
     "3 frames is over the limit of 2"),
    (DecodeLimits(max_jpeg_scans=5), encode(Image.new("RGB", (8, 8)), "JPEG", progressive=True),
     "in more than 5 progressive scans"),
], ids=["pixels", "frames", "scans"])
def test_over_budget_images_are_too_costly(limits, data, fragment):
    with pytest.raises(DecodeError) as info:
        decode_image(data, limits=limits)
    assert info.value.too_costly and fragment in info.value.message


@pytest.mark.parametrize("side", [5000, 20000])  # under and over Pillow's own bomb guard
def test_decompression_bomb_is_refused_from_the_header(side, monkeypatch):
    # A side x side PNG declared in a hundred bytes: refused before a pixel is inflated.
    import zlib

    bomb = png_bytes(np.zeros((1, 1), np.uint8))
    bomb = bomb[:16] + struct.pack(">II", side, side) + bomb[24:]
    bomb = bomb[:29] + struct.pack(">I", zlib.crc32(bomb[12:29])) + bomb[33:]
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(DecodeError) as info:
        decode_image(bomb)
    assert info.value.too_costly and "larger than the limit of 16777216 pixels" in info.value.message


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty image"),
    (b"hello", "not an image"),
    (encode(Image.new("L", (8, 8)), "GIF"), "GIF images are not accepted"),
    (encode(Image.new("RGB", (8, 8)), "TIFF"), "TIFF images are not accepted"),
])
def test_other_bytes_are_refused_in_one_line(data, fragment):
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert not info.value.too_costly and fragment in info.value.message and "\n" not in info.value.message


def test_training_names_the_file_of_a_refused_image():
    from cnnray.data.base import DataError
    from cnnray.data.imagefolder import ImageItem, decode_images

    good = encode(Image.fromarray(GRAY), "PNG")
    items = [ImageItem("train", "a", "a/ok.png", data=good), ImageItem("train", "a", "a/bad.png", data=good[:60]),
             ImageItem("test", "a", "t/ok.png", data=good)]
    with pytest.raises(DataError, match=r"cannot read image a/bad.png: cannot decode the PNG image"):
        decode_images(items, "x")


def test_jpeg_is_decoded_in_full_then_resized_not_drafted():
    """Pillow's draft() (libjpeg's DCT scaling) would decode a large JPEG at 1/2..1/8 size,
    cheaper but with other pixels than the full decode a viewer shows, resized: not used."""
    big = np.kron(RGB[:16, :16], np.ones((16, 16, 1), np.uint8))  # 256 x 256
    data = encode(Image.fromarray(big), "JPEG", quality=90)
    full = Image.open(io.BytesIO(data)).resize((32, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(decode_image(data, 3, (32, 32)), chw(np.asarray(full)))
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (32, 32))
    drafted = drafted.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    assert not np.array_equal(np.asarray(drafted), np.asarray(full))


# --- the decoded-image cache is keyed on the decoder ---------------------------------------------
def test_cache_entries_of_another_decoder_are_not_reused(tmp_path, monkeypatch):
    from cnnray.data import decode, imagefolder

    root = tmp_path / "tree"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.png").write_bytes(encode(Image.fromarray(GRAY), "PNG"))
    calls = []
    real = imagefolder.decode_images
    monkeypatch.setattr(imagefolder, "decode_images", lambda *a: calls.append(1) or real(*a))
    imagefolder.load_arrays(root, tmp_path / "cache", "imagefolder")
    imagefolder.load_arrays(root, tmp_path / "cache", "imagefolder")
    assert len(calls) == 1  # the second load is a cache hit
    monkeypatch.setattr(imagefolder, "DECODER_ID", decode.DECODER_ID + "-next")
    imagefolder.load_arrays(root, tmp_path / "cache", "imagefolder")
    assert len(calls) == 2  # a new decoder decodes again
    assert DECODER_ID.startswith("cnnray-decode-")


# --- serving: a served prediction of each variant equals the offline prediction -----------------
@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from fastapi.testclient import TestClient  # needs httpx2, a test extra

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import ModelRef
    from tests.helpers.serve import CIFAR_INFO, MNIST_INFO, save_model

    root = tmp_path_factory.mktemp("decode-serve")
    gray = save_model(root / "gray", "cnn", MNIST_INFO, seed=4)
    colour = save_model(root / "colour", "tutorial_cnn", CIFAR_INFO, seed=5)
    backend = LocalBackend({"gray": ModelRef(path=str(gray), version=1),
                            "colour": ModelRef(path=str(colour), version=1)})
    with TestClient(build_http_app(backend)) as client:
        yield client, {"gray": (gray, (1, 28, 28)), "colour": (colour, (3, 32, 32))}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_served_prediction_of_each_variant_is_the_offline_prediction(app_client, name):
    import base64

    from tests.helpers.serve import offline_probs

    client, models = app_client
    data, _, _ = variant(name)
    for model, (checkpoint, (c, h, w)) in models.items():
        offline = offline_probs(checkpoint, torch.from_numpy(decode_image(data, c, (h, w)))[None])[0]
        raw = client.post(f"/predictions/{model}", content=data, headers={"Content-Type": "application/octet-stream"})
        assert raw.status_code == 200, raw.text
        kserve = client.post(f"/v1/models/{model}:predict",
                             json={"instances": [{"b64": base64.b64encode(data).decode()}]})
        assert kserve.status_code == 200, kserve.text
        for probs in (raw.json()["probabilities"], kserve.json()["predictions"][0]["probabilities"]):
            assert torch.allclose(torch.tensor(probs), offline, atol=1e-5), (model, name)
        assert raw.json()["class_index"] == int(offline.argmax())


def test_served_16bit_digit_gets_its_8bit_twins_label(app_client):
    client, _ = app_client
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 250
    answers = []
    for img in (Image.fromarray(digit), Image.fromarray(digit.astype(np.uint16) * 257)):
        r = client.post("/predictions/gray", content=encode(img, "PNG"), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert answers[0]["label"] == answers[1]["label"]
    assert answers[0]["probabilities"] == answers[1]["probabilities"]


def test_served_mpo_jpg_is_accepted(app_client):
    client, _ = app_client
    r = client.post("/predictions/colour", content=variant("jpeg-mpo")[0], headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_served_over_budget_jpeg_is_413(app_client):
    client, _ = app_client
    attack = repeat_last_scan(encode(Image.fromarray(RGB), "JPEG", progressive=True), 500)
    r = client.post("/predictions/colour", content=attack, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "progressive scans" in r.json()["error"]


# --- the page shows no broken-image placeholder before the first prediction -----------------------
def test_page_hides_the_sent_image_until_there_is_one(app_client):
    from html.parser import HTMLParser

    client, _ = app_client
    page = client.get("/").text
    found = {}

    class Finder(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img" and dict(attrs).get("id") == "sent":
                found.update(dict(attrs))

    Finder().feed(page)
    assert "hidden" in found and not found.get("src")  # no src, and not displayed
    # shown only once the browser has decoded what was sent; hidden again for a non-image
    assert 'els.sent.addEventListener("load", () => { els.sent.hidden = false; })' in page
    assert 'els.sent.addEventListener("error", () => { els.sent.hidden = true; })' in page
