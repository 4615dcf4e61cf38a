"""One real `cnnray serve` (its Ray Serve deployment) with a cnn trained on real MNIST: the
:explain route, `cnnray predict --explain`, and the page in headless Chromium drawing a digit
and showing the heat maps and the strip of response maps (slow: starts Ray and a browser).

With CNNRAY_DOCS_SCREENSHOT=1 the page test also writes docs/img/explain-page.png."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers import REPO
from tests.helpers.browser import headless_chromium
from tests.helpers.cli import run_cli
from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http

pytestmark = pytest.mark.slow

SERVER: dict[str, int] = {}  # the served fixture's `cnnray serve` process id, for the process checks

MNIST = {"dataset": "mnist", "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)],
         "mean": [0.1307], "std": [0.3081]}


@pytest.fixture(scope="module")
def served(tmp_path_factory, mnist_dir, data_cache):
    import torch

    from cnnray.checkpoint import save_checkpoint
    from cnnray.data import load_dataset
    from cnnray.models import build_model, resolve_model_args

    root = tmp_path_factory.mktemp("explain-serve")
    ds = load_dataset("mnist", mnist_dir)
    args = resolve_model_args("cnn")
    torch.manual_seed(0)
    model = build_model("cnn", **args)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = (ds.train_images[:6400].float() / 255 - 0.1307) / 0.3081
    y = ds.train_labels[:6400]
    for i in range(0, 6400, 64):  # one pass over 6,400 digits: ~95% accurate, enough to draw with
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ck = save_checkpoint(root / "cnn", model_name="cnn", model_args=args, state_dict=model.state_dict(),
                         data_info=MNIST, epoch=1, config={"seed": 0}, metrics={"val_accuracy": 0.95})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "serve.log", "w+")
    proc = spawn_cnnray(["serve", "--checkpoint", str(ck), "--name", "digits", "--port", str(port),
                         "--replicas", "1", "--watch-s", "0"], output=log)
    try:
        wait_http(url + "/healthz", proc, log, "cnnray serve")
        SERVER["pid"] = proc.pid
        yield url, ds
    finally:
        proc.send_signal(2)  # Ctrl-C: serve removes what it started
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"cnnray serve did not stop:\n{log_tail(log)}")


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_the_served_explain_route_answers(served):
    url, ds = served
    data = png(ds.test_images[0, 0].numpy())
    r = requests.post(f"{url}/v1/models/digits:explain?layers=conv2.0&channels=2", data=data,
                      headers={"Content-Type": "image/png"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction"]["label"] == str(int(ds.test_labels[0]))
    assert set(body["explanations"]) == {"occlusion", "gradcam"}
    assert [m["layer"] for m in body["feature_maps"]] == ["conv2.0"] and len(body["feature_maps"][0]["channels"]) == 2
    bad = requests.post(f"{url}/v1/models/digits:explain?layers=fc", data=data, headers={"Content-Type": "image/png"},
                        timeout=60)
    assert bad.status_code == 400 and "this model's conv layers: conv1.0, conv2.0" in bad.json()["error"]


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants now alive (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _nices(pid: int, field: int = 19) -> list[int]:
    """A field of every thread of `pid` in /proc/PID/task/TID/stat: 19 the nice value, 41
    the scheduling policy (5: SCHED_IDLE); proc(5) numbers them from 1, the comm (2) in ()."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[field - 3]))
        except OSError:
            continue
    return out


def test_explanations_run_in_their_own_replica_process_at_low_priority(served):
    """The mechanism as deployed: the ExplainServer replica is a process of its own, every
    thread of it in SCHED_IDLE at nice +10, while the predict replicas keep the normal class."""
    from cnnray.serve.explain import EXPLAIN_NICE

    url, ds = served
    if min(_nices(SERVER["pid"])) >= EXPLAIN_NICE:
        pytest.skip("cnnray serve runs at nice >= 10 already: nothing to tell apart")
    r = requests.post(f"{url}/v1/models/digits:explain?methods=gradcam", data=png(ds.test_images[1, 0].numpy()),
                      headers={"Content-Type": "image/png"}, timeout=120)
    assert r.status_code == 200, r.text
    titles = {}
    for pid in _tree(SERVER["pid"]):
        try:
            titles[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    explain = [p for p, t in titles.items() if b"ServeReplica:cnnray:ExplainServer" in t]
    predict = [p for p, t in titles.items() if b"ServeReplica:cnnray:ModelServer" in t]
    assert len(explain) == 1 and predict, {p: t[:80] for p, t in titles.items()}
    assert min(_nices(explain[0])) >= EXPLAIN_NICE and set(_nices(explain[0], field=41)) == {5}  # SCHED_IDLE
    assert all(min(_nices(p)) < EXPLAIN_NICE and 5 not in _nices(p, field=41) for p in predict)


def test_predict_explain_writes_the_overlays_beside_the_images(served, tmp_path, capsys):
    """`cnnray predict --explain` in this process (tests/helpers/cli.py): the client's
    output files and its refusal to overwrite them."""
    url, ds = served
    files = []
    for i in range(2):
        f = tmp_path / f"digit{i}.png"
        f.write_bytes(png(ds.test_images[i, 0].numpy()))
        files.append(f)
    args = ["predict", "--url", url, "--model", "digits", "--explain", *map(str, files)]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    for i, f in enumerate(files):
        for method in ("occlusion", "gradcam"):
            written = tmp_path / f"digit{i}.{method}.png"
            assert f"  wrote {written}" in out
            with Image.open(written) as img:
                assert img.size == (112, 112)
    code, _, lines = run_cli(capsys, *args)
    assert code == 2 and "exists: remove it or pass --overwrite" in "\n".join(lines), lines


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "profile", window=(900, 1100)) as b:
        yield b


def test_page_shows_the_heat_maps_and_response_maps_while_drawing(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    browser.get(url + "/")
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    assert not browser.find_element(By.ID, "explain").is_displayed()
    status = browser.find_element(By.ID, "explain-status")
    # Draw a "7" without pressing Predict: the explanation follows the drawing (debounced).
    pad = browser.find_element(By.ID, "pad")
    (ActionChains(browser).move_to_element_with_offset(pad, -80, -90).click_and_hold()
     .move_by_offset(80, 0).move_by_offset(80, 0).move_by_offset(-50, 90).move_by_offset(-50, 90).release().perform())
    WebDriverWait(browser, 120).until(lambda b: int(status.get_attribute("data-done")) >= 1)
    assert status.get_attribute("data-state") == "ok", status.text
    assert browser.find_element(By.ID, "explain").is_displayed()
    figures = browser.find_elements(By.CSS_SELECTOR, "#heat figure.heatmap")
    assert [f.get_attribute("data-method") for f in figures] == ["occlusion", "gradcam"]
    for f in figures:
        image = f.find_element(By.TAG_NAME, "img")
        assert image.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", image) == 112
    rows = browser.find_elements(By.CSS_SELECTOR, "#strip .layer")
    assert [r.get_attribute("data-layer") for r in rows] == ["conv1.0", "conv2.0"]
    assert "conv1.0: 16x28x28 (formula 16x28x28)" in rows[0].text
    for r in rows:
        maps = r.find_elements(By.TAG_NAME, "img")
        assert len(maps) == 4 and all(browser.execute_script("return arguments[0].naturalWidth", m) > 0 for m in maps)
    # Predict: the top 3 come as before, and the explanation follows the prediction.
    done = int(status.get_attribute("data-done"))
    browser.find_element(By.ID, "predict").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").get_attribute("data-done") == "1")
    WebDriverWait(browser, 120).until(lambda b: int(status.get_attribute("data-done")) > done)
    top = browser.find_element(By.CSS_SELECTOR, "#top3 li.pred .label").text
    assert f"(class {top}," in status.text
    shot = tmp_path / "explain-page.png"
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(900, min(2400, height + 320))  # the whole page, heat maps and strip included
    browser.save_screenshot(str(shot))
    if os.environ.get("CNNRAY_DOCS_SCREENSHOT"):
        with Image.open(shot) as img:  # a small PNG for the docs: palette colours
            img.convert("RGB").quantize(64).save(REPO / "docs" / "img" / "explain-page.png", optimize=True)
