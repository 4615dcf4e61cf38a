"""The real Ray Serve that tests/serve/test_api.py shares across its tests (a private Ray
with 2 CPUs unless one runs, Serve on a free loopback port, deployed as `cnnray serve`
deploys it), and the requests and scrapes those tests make."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
import torch

from tests.helpers.processes import free_port
from tests.helpers.serve import CIFAR_INFO, MNIST_INFO, save_model, train_cnn

LIMITS = {"max_body_bytes": 256 * 1024, "max_instances": 8, "max_image_pixels": 512 * 512}


@dataclass
class Server:
    url: str
    runner: object
    store: Path
    root: Path
    trained: Path  # a cnn trained on a real-MNIST subset (the "digits" model, and swap version 2)
    test_x: torch.Tensor  # real MNIST test images, uint8 N x 1 x 28 x 28
    test_y: torch.Tensor
    replica: str


@contextlib.contextmanager
def api_server(root: Path, mnist_dir: Path) -> Iterator[Server]:
    """Serve, in `root`: "digits" (a cnn trained on a real-MNIST subset), "swap" and "colour"
    from a model store, "direct" from a checkpoint; stopped (and its own Ray) on exit."""
    import ray

    from cnnray.data import load_dataset
    from cnnray.serve.runner import ServeRunner
    from cnnray.serve.schemas import Limits, ServeArgs
    from cnnray.store import export

    ds = load_dataset("mnist", mnist_dir)
    model = train_cnn(ds.train_images[:6000], ds.train_labels[:6000], steps=300)
    trained = save_model(root / "trained", "cnn", MNIST_INFO, model=model, metrics={"val_accuracy": 0.9})
    store = root / "store"
    export(trained, store, "digits")
    export(save_model(root / "swap1", "cnn", MNIST_INFO, seed=1), store, "swap")
    export(save_model(root / "colour", "tutorial_cnn", CIFAR_INFO, seed=2), store, "colour")
    direct = save_model(root / "direct", "lenet5", MNIST_INFO, seed=3)

    own_ray = not ray.is_initialized()
    ingress = None
    if own_ray:  # on the fast ingress, as `cnnray serve` runs (else on the session Ray's proxy)
        from cnnray.serve.ingress import FastIngress

        os.environ.pop("RAY_ADDRESS", None)
        ingress = FastIngress()
        ingress.__enter__()
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        ingress.restore_environ()  # for the tests that follow; this Ray keeps the settings
    args = ServeArgs(
        model_store=str(store),
        checkpoints={"direct": str(direct)},
        replicas=1,  # the last test scales to two
        watch_s=0,  # the tests call runner.refresh() themselves
        batch_wait_timeout_s=0.02,  # a wide window, so the batching test sees batches form
        limits=Limits(**LIMITS),
    )
    runner = ServeRunner(args, host="127.0.0.1", port=free_port())
    try:
        url = runner.start(timeout_s=300)
        replica = requests.get(url + "/healthz", timeout=30).json()["replica"]
        yield Server(url, runner, store, root, trained, ds.test_images[:200], ds.test_labels[:200], replica)
    finally:
        try:
            runner.stop()
        finally:
            if own_ray:
                ray.shutdown()
                ingress.close()


def post_png(server: Server, model: str, data: bytes, content_type: str = "image/png") -> requests.Response:
    return requests.post(f"{server.url}/predictions/{model}", data=data, headers={"Content-Type": content_type},
                         timeout=60)


def kserve(server: Server, model: str, instances: list) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/{model}:predict", json={"instances": instances}, timeout=60)


def scrape(server: Server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def requests_total(m: dict, model: str, api: str, status: int) -> float:
    return m.get(("cnnray_serve_requests_total", (("api", api), ("model", model), ("status", str(status)))), 0.0)


def model_info(server: Server, name: str) -> dict:
    return {m["name"]: m for m in requests.get(server.url + "/v1/models", timeout=30).json()["models"]}[name]


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def page_result(browser, done: int) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda b: status.get_attribute("data-done") == str(done))
    return [(li.find_element(By.CLASS_NAME, "label").text, float(li.get_attribute("data-probability")))
            for li in browser.find_elements(By.CSS_SELECTOR, "#top3 li.pred")]
