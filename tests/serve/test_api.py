"""The serving app on a real Ray Serve: every endpoint, every bad request, metrics after traffic,
a hot swap under traffic, the web page in headless Chromium, and `cnnray predict`.

One Serve instance for the module (tests/helpers/serve_api.py: a private Ray with 2 CPUs and
Serve on a free loopback port, deployed as `cnnray serve` deploys it, then stopped). The
tests share it, in this order, so they stay in this one module rather than one file per
behaviour: each module of its own would start another Serve.
"""

from __future__ import annotations

import base64
import io
import shutil
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.helpers.browser import headless_chromium
from tests.helpers.cli import assert_one_line_exit_2, run_cli
from tests.helpers.serve import API_NOISE as NOISE
from tests.helpers.serve import BAD, CIFAR_INFO, MNIST_INFO, b64, encode, offline_probs, png, save_model
from tests.helpers.serve_api import (api_server, kserve, model_info, page_result, post_png, requests_total, scrape,
                                     wait_for)


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_dir, data_cache):
    with api_server(tmp_path_factory.mktemp("serve"), mnist_dir) as s:
        yield s


# --- endpoints ------------------------------------------------------------------------------------
def test_healthz(server):
    r = requests.get(server.url + "/healthz", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": ["colour", "digits", "direct", "swap"], "replica": server.replica}


def test_models_list_versions_shapes_classes_and_checkpoint_metrics(server):
    r = requests.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {"colour", "digits", "direct", "swap"}
    digits = models["digits"]
    assert digits["version"] == 1 and digits["ready"] and digits["architecture"] == "cnn"
    assert digits["input_shape"] == [1, 28, 28] and digits["classes"] == [str(i) for i in range(10)]
    assert digits["metrics"] == {"val_accuracy": 0.9} and digits["dataset"] == "mnist"
    assert models["colour"]["input_shape"] == [3, 32, 32] and models["colour"]["classes"][0] == "airplane"
    assert models["direct"]["architecture"] == "lenet5" and models["direct"]["version"] == 1
    # NaN in a checkpoint's metrics is sent as null, not as invalid JSON
    assert models["swap"]["metrics"] == {"val_accuracy": 0.1, "val_loss": None}


def test_model_readiness(server):
    r = requests.get(server.url + "/v1/models/digits", timeout=30)
    assert r.status_code == 200 and r.json() == {"name": "digits", "version": 1, "ready": True, "error": None}
    r = requests.get(server.url + "/v1/models/nope", timeout=30)
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]


def test_openapi_documents_the_api(server):
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/models", "/v1/models/{name}", "/v1/models/{name}:predict", "/predictions/{name}"} <= set(paths)


def test_kserve_b64_and_arrays_give_the_offline_predictions(server):
    x = server.test_x[:8]
    expected = offline_probs(server.trained, x)
    r = kserve(server, "digits", [b64(png(img[0].numpy())) for img in x])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == 1
    got = torch.tensor([p["probabilities"] for p in body["predictions"]])
    assert [p["class_index"] for p in body["predictions"]] == expected.argmax(1).tolist()
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in expected.argmax(1).tolist()]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the same pixels as C x H x W arrays of 0..255 values
    r = kserve(server, "digits", [img.tolist() for img in x])
    assert r.status_code == 200, r.text
    got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_torchserve_png_and_jpeg_are_converted_as_training_converts(server):
    from tests.helpers.serve import training_decode

    x = server.test_x[:1]
    r = post_png(server, "digits", png(x[0, 0].numpy()))
    assert r.status_code == 200, r.text
    expected = offline_probs(server.trained, x)[0]
    torch.testing.assert_close(torch.tensor(r.json()["probabilities"]), expected, atol=1e-5, rtol=0)
    assert r.json()["class_index"] == int(expected.argmax()) and r.json()["model_version"] == 1
    # A colour JPEG of another size, for the colour model: decoded, resized and normalised
    # as training would (PUT works too, as with TorchServe's `curl -T`).
    rng = np.random.default_rng(0)
    first = encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG")
    photo = encode(Image.fromarray(rng.integers(0, 256, (45, 50, 3), dtype=np.uint8)), "JPEG", quality=85)
    pixels = torch.from_numpy(training_decode([first, photo])[1:2])
    r = requests.put(f"{server.url}/predictions/colour", data=photo, headers={"Content-Type": "image/jpeg"},
                     timeout=60)
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["probabilities"]),
                               offline_probs(server.root / "colour", pixels)[0], atol=1e-5, rtol=0)
    assert r.json()["label"] == CIFAR_INFO["classes"][r.json()["class_index"]]


def test_a_directly_named_checkpoint_is_served(server):
    x = server.test_x[:2]
    r = kserve(server, "direct", [b64(png(img[0].numpy())) for img in x])
    assert r.status_code == 200 and r.json()["model_version"] == 1
    torch.testing.assert_close(torch.tensor([p["probabilities"] for p in r.json()["predictions"]]),
                               offline_probs(server.root / "direct", x), atol=1e-5, rtol=0)


# --- bad requests: 4xx with {"error": ...}, and the replica stays up -----------------------------------


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_answers_4xx_with_an_error(server, case):
    _, method, path, body, ctype, status, fragment = case
    headers = {"Content-Type": ctype} if ctype else {}
    r = requests.request(method, server.url + path, data=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert list(r.json()) == ["error"] and fragment in r.json()["error"], r.json()


def test_chunked_body_over_the_limit_is_refused_while_streaming(server):
    def chunks():  # no Content-Length: the server counts the bytes as they arrive
        for _ in range(40):
            yield bytes(16 * 1024)

    r = requests.post(server.url + "/predictions/digits", data=chunks(), headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_the_replica_survived_every_bad_request(server):
    r = requests.get(server.url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["replica"] == server.replica
    assert post_png(server, "digits", png(NOISE)).status_code == 200


# --- metrics and batching --------------------------------------------------------------------------
def test_metrics_count_requests_latency_and_batches(server):
    before = scrape(server)
    good = png(server.test_x[0, 0].numpy())
    for _ in range(5):
        assert post_png(server, "digits", good).status_code == 200
    for _ in range(3):
        assert kserve(server, "digits", [b64(good), b64(good)]).status_code == 200
    for _ in range(2):
        assert post_png(server, "digits", b"no image").status_code == 400
    assert kserve(server, "nope", [b64(good)]).status_code == 404
    after = scrape(server)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    def more(model: str, api: str, status: int) -> float:
        return requests_total(after, model, api, status) - requests_total(before, model, api, status)

    assert more("digits", "torchserve", 200) == 5
    assert more("digits", "kserve", 200) == 3
    assert more("digits", "torchserve", 400) == 2
    assert more("_unknown", "kserve", 404) == 1
    assert delta(("cnnray_serve_request_latency_seconds_count", (("model", "digits"),))) == 10
    assert delta(("cnnray_serve_request_latency_seconds_bucket", (("le", "+Inf"), ("model", "digits")))) == 10
    assert delta(("cnnray_serve_batch_size_sum", (("model", "digits"),))) == 5 + 3 * 2  # images
    assert after[("cnnray_serve_in_flight_requests", (("model", "digits"),))] == 0
    assert after[("cnnray_serve_model_version", (("model", "digits"),))] == 1
    assert after[("cnnray_serve_replicas", ())] == 1


def test_concurrent_requests_are_batched(server):
    from concurrent.futures import ThreadPoolExecutor

    before = scrape(server)
    images = [png(img[0].numpy()) for img in server.test_x[:64]]
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda d: post_png(server, "digits", d).status_code, images))
    assert codes == [200] * 64
    after = scrape(server)
    passes = after[("cnnray_serve_batch_size_count", (("model", "digits"),))] - \
        before[("cnnray_serve_batch_size_count", (("model", "digits"),))]
    images_done = after[("cnnray_serve_batch_size_sum", (("model", "digits"),))] - \
        before[("cnnray_serve_batch_size_sum", (("model", "digits"),))]
    assert images_done == 64
    assert passes < 64, "32 concurrent clients should share forward passes"


# --- hot swap --------------------------------------------------------------------------------------
def test_new_store_version_is_swapped_in_under_traffic_without_a_failed_request(server):
    from cnnray.serve.schemas import ModelRef
    from cnnray.store import export

    image = server.test_x[:1]
    data = png(image[0, 0].numpy())
    results: list[tuple] = []
    stop = threading.Event()

    def client(api: str) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                if api == "kserve":
                    r = session.post(f"{server.url}/v1/models/swap:predict", json={"instances": [b64(data)]},
                                     timeout=60)
                    body = r.json()
                    probs = body["predictions"][0]["probabilities"] if r.status_code == 200 else None
                else:
                    r = session.post(f"{server.url}/predictions/swap", data=data,
                                     headers={"Content-Type": "image/png"}, timeout=60)
                    body = r.json()
                    probs = body.get("probabilities")
                results.append((r.status_code, body.get("model_version"), probs, body.get("error")))
            except Exception as e:  # a dropped connection is a failed request too
                results.append((None, None, None, repr(e)))

    threads = [threading.Thread(target=client, args=(api,)) for api in ["torchserve", "kserve"] * 3]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(r[1] == 1 for r in results) >= 20, 120, "traffic on version 1")
        v2 = export(server.trained, server.store, "swap")
        assert server.runner.refresh() == {"swap": ModelRef(path=str(v2), version=2)}
        wait_for(lambda: any(r[1] == 2 for r in results), 120, "an answer from version 2")
        seen = len(results)
        wait_for(lambda: len(results) >= seen + 30, 120, "traffic on version 2")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    assert {r[1] for r in results} == {1, 2}
    assert all(r[1] == 2 for r in results[-10:])
    # the answers are those of each version's own checkpoint
    old = offline_probs(server.root / "swap1", image)[0]
    new = offline_probs(server.trained, image)[0]
    for _, version, probs, _ in results:
        torch.testing.assert_close(torch.tensor(probs), old if version == 1 else new, atol=1e-5, rtol=0)
    # reconfigured in place: the same replica, now at version 2
    assert requests.get(server.url + "/healthz", timeout=30).json()["replica"] == server.replica
    assert requests.get(server.url + "/v1/models/swap", timeout=30).json()["version"] == 2


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(server):
    from cnnray.store import export

    # Valid digests, but the model cannot take the input shape its meta.json declares.
    broken = save_model(server.root / "broken", "cnn", MNIST_INFO, input_shape=[1, 20, 20])
    v3 = export(broken, server.store, "swap")
    server.runner.refresh()
    wait_for(lambda: "error" in model_info(server, "swap") and model_info(server, "swap")["error"], 120, "the load failure")
    info = model_info(server, "swap")
    assert info["version"] == 2 and info["ready"] and "version 3 failed to load" in info["error"]
    r = post_png(server, "swap", png(NOISE))
    assert r.status_code == 200 and r.json()["model_version"] == 2
    shutil.rmtree(v3)  # withdrawn: the error goes away
    server.runner.refresh()
    wait_for(lambda: not model_info(server, "swap").get("error"), 120, "the error to clear")


# --- cnnray predict ------------------------------------------------------------------------------------
def test_cli_predict_prints_label_and_probability(server, tmp_path, capsys):
    """`cnnray predict` in this process (tests/helpers/cli.py): the client's output and its
    one-line refusal; the program's exit path is tests/cli/test_cli.py's."""
    files = []
    for i in range(3):
        f = tmp_path / f"digit{i}.png"
        f.write_bytes(png(server.test_x[i, 0].numpy()))
        files.append(f)
    expected = offline_probs(server.trained, server.test_x[:3])
    code, out, err = run_cli(capsys, "predict", "--url", server.url, "--model", "digits", *map(str, files))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line, f, probs in zip(lines, files, expected):
        path, label, prob = line.split()
        assert path == str(f) and label == str(int(probs.argmax()))
        assert abs(float(prob) - float(probs.max())) < 1e-3
    result = run_cli(capsys, "predict", "--url", server.url, "--model", "nope", str(files[0]))
    assert_one_line_exit_2(result, "unknown model 'nope'")


# --- the page, in headless Chromium --------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "profile", window=(1000, 900)) as b:
        yield b


def test_page_draw_and_upload_show_the_top_3(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    select = browser.find_element(By.ID, "model")
    WebDriverWait(browser, 60).until(lambda b: len(select.find_elements(By.TAG_NAME, "option")) == 4)
    Select(select).select_by_value("digits")
    assert "cnn, input 1x28x28, accuracy 90.00%" in browser.find_element(By.ID, "model-info").text
    # Nothing where the sent image goes until there is one (no broken-image placeholder).
    assert not browser.find_element(By.ID, "sent").is_displayed()

    # Draw a "7": a bar, then a diagonal down to the bottom left.
    pad = browser.find_element(By.ID, "pad")
    (ActionChains(browser).move_to_element_with_offset(pad, -80, -90).click_and_hold()
     .move_by_offset(80, 0).move_by_offset(80, 0).move_by_offset(-50, 90).move_by_offset(-50, 90).release().perform())
    browser.find_element(By.ID, "predict").click()
    top3 = page_result(browser, 1)
    assert len(top3) == 3 and browser.find_element(By.ID, "error").text == ""
    assert [p for _, p in top3] == sorted((p for _, p in top3), reverse=True) and sum(p for _, p in top3) <= 1 + 1e-6
    # The page shows what it sent (the drawing framed as MNIST digits are: 28x28, gray on
    # black); the API's answer for those same bytes ranks the same three classes.
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "sent").is_displayed())
    sent = browser.find_element(By.ID, "sent").get_attribute("src")
    assert sent.startswith("data:image/png;base64,")
    data = base64.b64decode(sent.split(",", 1)[1])
    img = Image.open(io.BytesIO(data))
    assert img.size == (28, 28) and np.asarray(img.convert("L")).max() > 128
    api = post_png(server, "digits", data).json()["probabilities"]
    ranked = sorted(range(10), key=lambda i: -api[i])[:3]
    assert [label for label, _ in top3] == [str(i) for i in ranked]
    for (_, p), i in zip(top3, ranked):
        assert abs(p - api[i]) < 1e-5

    # Upload a real MNIST test digit that the model gets right: the page's top class is its label.
    probs = offline_probs(server.trained, server.test_x)
    k = next(i for i in range(len(server.test_y)) if int(probs[i].argmax()) == int(server.test_y[i]))
    upload = tmp_path / "digit.png"
    upload.write_bytes(png(server.test_x[k, 0].numpy()))
    browser.find_element(By.ID, "file").send_keys(str(upload))
    top3 = page_result(browser, 2)
    assert top3[0][0] == str(int(server.test_y[k]))
    assert abs(top3[0][1] - float(probs[k].max())) < 1e-4

    # A file that is not an image: the page shows the server's error, and no classes.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a digit")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    assert page_result(browser, 3) == []
    WebDriverWait(browser, 10).until(lambda b: not b.find_element(By.ID, "sent").is_displayed())
    assert "send image/png, image/jpeg or image/bmp" in browser.find_element(By.ID, "error").text


# --- several replicas (last: the module's server keeps two from here on) --------------------------------
def test_two_replicas_share_the_traffic_and_metrics_add_up(server):
    server.runner.scale(2)
    seen: set[str] = set()
    wait_for(lambda: seen.add(requests.get(server.url + "/healthz", timeout=30).json()["replica"]) or len(seen) == 2,
          180, "a second replica")
    assert server.replica in seen  # the first one was not restarted
    before = scrape(server)
    data = png(NOISE)
    for _ in range(40):
        assert post_png(server, "digits", data).status_code == 200

    def counted() -> float:
        m = scrape(server)
        return requests_total(m, "digits", "torchserve", 200) - requests_total(before, "digits", "torchserve", 200)

    # A scrape reaches one replica; the other's figures arrive within its push period (2 s).
    wait_for(lambda: counted() == 40, 60, "both replicas' counts in one scrape")
    assert scrape(server)[("cnnray_serve_replicas", ())] == 2
