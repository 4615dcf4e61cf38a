"""Draw the documentation's pictures (docs/img/*.png) from real cnnray runs.

    PYTHONPATH=$PWD python docs/make_figures.py --data-dir ../shared/datasets/mnist --runs /tmp/docs-runs

Runs, all small and outside the repository (under --runs; nothing there is committed):
a 2-epoch `cnnray train` of the MNIST CNN on a 5,000-image subset (local mode: no Ray),
its report page, a 4-trial `cnnray tune` sweep on a 2,000-image subset (starts a private
local Ray and stops it), and `cnnray serve` of the trained checkpoint (started, shot and
stopped with SIGTERM). Screenshots use Debian's headless `chromium` (the digit page through `chromium-driver`
and selenium, the test extra's, to draw a digit and press Predict). The DDP data-flow
diagram is drawn with matplotlib. Every PNG is reduced to a 256-colour palette so each
stays well under 200 KB. Takes ~3-6 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

IMG = Path(__file__).resolve().parent / "img"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def cnnray(*args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cnnray.cli", *args]
    print("$", " ".join(cmd), flush=True)
    if kw.pop("background", False):
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, check=True, **kw)


def shrink(src: Path, dst: Path, width: int) -> None:
    """Scale src to `width` pixels wide and save a 256-colour PNG (a screenshot's flat colours survive)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    print(f"{dst.relative_to(IMG.parent.parent)}: {dst.stat().st_size // 1024} KB", flush=True)


def screenshot(url: str, dst: Path, size: str, width: int) -> None:
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as shots:
        raw = Path(shots) / "shot.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={raw}",
                        f"--window-size={size}", "--virtual-time-budget=3000", url],
                       check=True, capture_output=True, timeout=120)
        shrink(raw, dst, width)


def ddp_diagram(dst: Path) -> None:
    """Data flow of one `cnnray train --workers 2` epoch, boxes and arrows only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 52)
    ax.axis("off")

    def box(x, y, w, h, text, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.6", fc=color, ec="#333", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)

    def arrow(x0, y0, x1, y1, text="", both=False):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="<->" if both else "->", color="#333"))
        if text:
            ax.text((x0 + x1) / 2 + 1, (y0 + y1) / 2, text, fontsize=7.5, color="#333", va="center")

    box(2, 38, 26, 10, "cnnray train (driver)\nTrainConfig, pre-flight checks\nclaims --out", "#dbe9f6")
    box(37, 38, 26, 10, "Ray Train controller\nTorchTrainer, ScalingConfig,\nFailure- and CheckpointConfig", "#e8e0f3")
    box(72, 38, 26, 10, "storage path\n(<out>/ray, shared FS or s3://)\nepoch-NNNN/ checkpoints", "#f3ead8")
    arrow(28.6, 43, 36.4, 43)
    for i, x in enumerate((3, 63)):
        box(x, 10, 33, 14, f"worker rank {i}: shard {i} of the data\n(uint8, in memory), batch/2 a step,\n"
            "bf16 autocast, forward + backward", "#dff0dc")
        arrow(50, 37.4, x + 16.5, 24.6, both=True)
    ax.text(51, 31, "train_loop_config down,\nmetrics every epoch up", fontsize=7.5, ha="center")
    arrow(36.6, 17, 62.4, 17, both=True)
    ax.text(49.5, 12, "all-reduce of the\ngradients every step\n(gloo on CPU, NCCL on GPU)", ha="center", fontsize=7.5)
    arrow(30, 24.6, 80, 37.4)
    ax.text(8, 30, "rank 0 writes each\nepoch's checkpoint", fontsize=7.5)
    box(25, 1, 50, 3.5, "dataset files (--data-dir): each worker reads them and keeps its shard", "#f6f6f6")
    arrow(35, 5.2, 20, 9.4)
    arrow(65, 5.2, 80, 9.4)
    fig.savefig(dst.with_suffix(".raw.png"))
    plt.close(fig)
    shrink(dst.with_suffix(".raw.png"), dst, 900)
    dst.with_suffix(".raw.png").unlink()


def draw_and_shoot(url: str, dst: Path) -> None:
    """Draw a 7 on the digit page, press Predict, wait for the top 3, and shoot the page
    (selenium driving Debian's chromium through chromium-driver, as the page's test does)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or sys.exit("needs Debian's chromium")
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as shots:
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=900,1000"]:
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            browser.get(url)
            WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
            pad = browser.find_element(By.ID, "pad")
            (ActionChains(browser).move_to_element_with_offset(pad, -80, -90).click_and_hold()
             .move_by_offset(80, 0).move_by_offset(80, 0).move_by_offset(-50, 90).move_by_offset(-50, 90)
             .release().perform())
            browser.find_element(By.ID, "predict").click()
            status = browser.find_element(By.ID, "status")
            WebDriverWait(browser, 60).until(lambda b: status.get_attribute("data-done") == "1")
            time.sleep(0.5)  # the sent image's <img> decodes after the answer
            raw = Path(shots) / "shot.png"
            browser.save_screenshot(str(raw))
        finally:
            browser.quit()
        shrink(raw, dst, 700)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_page(checkpoint: str, dst: Path) -> None:
    port = free_port()
    proc = cnnray("serve", "--checkpoint", checkpoint, "--name", "mnist", "--port", str(port),
                  "--replicas", "1", background=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/mnist", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("cnnray serve did not come up")
                time.sleep(2)
        draw_and_shoot(f"http://127.0.0.1:{port}/", dst)
    finally:
        proc.terminate()  # SIGTERM: cnnray serve removes what it started
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the MNIST IDX files")
    ap.add_argument("--runs", default="/tmp/docs-runs", help="where the runs go (not the repository)")
    ap.add_argument("--only", nargs="*", default=["ddp", "report", "serve", "sweep"])
    a = ap.parse_args()
    runs = Path(a.runs).resolve()
    IMG.mkdir(exist_ok=True)
    data = os.path.abspath(a.data_dir)
    if "ddp" in a.only:
        ddp_diagram(IMG / "ddp.png")
    run = runs / "train"
    if {"report", "serve"} & set(a.only) and not (run / "result.json").exists():
        cnnray("train", "--model", "cnn", "--dataset", "mnist", "--data-dir", data, "--epochs", "2",
               "--subset", "5000", "--out", str(run))
    if "report" in a.only:
        screenshot((run / "report" / "report.html").as_uri(), IMG / "report.png", "1100,1500", 800)
    if "serve" in a.only:
        serve_page(json.loads((run / "result.json").read_text())["checkpoint"], IMG / "serve-page.png")
    if "sweep" in a.only:
        sweep = runs / "sweep"
        if not (sweep / "sweep.png").exists():
            cnnray("tune", "--model", "cnn", "--dataset", "mnist", "--data-dir", data, "--subset", "2000",
                   "--epochs", "2", "--samples", "4", "--out", str(sweep))
        shrink(sweep / "sweep.png", IMG / "sweep.png", 800)


if __name__ == "__main__":
    main()
