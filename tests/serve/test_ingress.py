"""The fast ingress `cnnray serve` uses by default: Ray's own settings checked against the
installed Ray, HAProxy's operator ports rewritten onto loopback, and a real `cnnray serve`
whose every listening socket is on 127.0.0.1 and which leaves no process or listener
behind after SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import REPO
from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http
from tests.helpers.serve import MNIST_INFO, png, save_model


@pytest.fixture
def short_dir():
    """A folder whose path leaves room for HAProxy's socket paths (pytest's tmp_path is too long)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cnnray-t-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ray_serve_constants() -> str:
    import ray.serve._private.constants as c

    return Path(c.__file__).read_text()


def test_every_ray_setting_we_set_is_read_by_the_installed_ray(short_dir):
    """The names are checked against the installed Ray's source (a misspelt one is ignored silently)."""
    from cnnray.serve.ingress import fast_ingress_env

    source = _ray_serve_constants()
    env = fast_ingress_env(short_dir)
    ray_names = [k for k in env if k.startswith("RAY_")]
    assert "RAY_SERVE_ENABLE_HA_PROXY" in ray_names and "RAY_SERVE_THROUGHPUT_OPTIMIZED" in ray_names
    for name in ray_names:
        assert re.search(rf'["\']{name}["\']', source), f"{name} is not read in ray/serve/_private/constants.py"
    # HAProxy's operator ports: free ones, not Ray's fixed 8404 and 9101.
    assert {env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]}.isdisjoint({"8404", "9101"})


def _render_ray_haproxy_config(tmp_path: Path, host: str) -> str:
    """The HAProxy config Ray itself writes (its own template and config class)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=8123), socket_path=str(tmp_path / "admin.sock"),
                        server_state_file=str(tmp_path / "state"), server_state_base=str(tmp_path))
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


@pytest.mark.parametrize("host, frontend", [("127.0.0.1", "127.0.0.1:8123"), ("0.0.0.0", "*:8123")])
def test_haproxy_wrapper_moves_the_operator_ports_onto_loopback(tmp_path, short_dir, host, frontend):
    from cnnray.serve.ingress import fast_ingress_env

    cfg = tmp_path / "haproxy.cfg"
    original = _render_ray_haproxy_config(tmp_path, host)
    binds = lambda text: re.findall(r"^\s+bind\s+(\S+)", text, flags=re.M)  # noqa: E731
    # Ray's own config listens on every interface for its stats page and metrics.
    assert sorted(b.split(":")[0] for b in binds(original) if not b.endswith(":8123")) == ["", "*"]
    env = fast_ingress_env(short_dir)
    # What Ray runs: the wrapper with HAProxy's arguments (-c: check the config and exit).
    r = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(cfg)], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rewritten = cfg.read_text()
    after = binds(rewritten)
    assert frontend in after  # the serving port keeps the host --host gave it
    others = [b for b in after if not b.endswith(":8123")]
    assert len(others) == 2 and all(b.startswith("127.0.0.1:") for b in others), after
    # Besides: HAProxy's own errors answer JSON, forwarded requests skip Serve's disconnect
    # watcher, and nothing else changed.
    added = [ln.strip() for ln in rewritten.splitlines() if ln not in original.splitlines() and "bind" not in ln]
    folder = cfg.parent
    assert sorted(added) == sorted(
        [f"errorfile {code} {folder}/cnnray-{code}.http" for code in (400, 408, 413, 501)]
        + [f"errorfile {code} {folder}/cnnray-500.http" for code in (502, 503, 504)]
        + ["http-request set-header x-request-disconnect-disabled ?1"]
    )
    removed = [ln for ln in original.splitlines() if ln not in rewritten.splitlines() and "bind" not in ln]
    assert [ln.split()[:2] for ln in removed] == [["errorfile", str(c)] for c in (502, 503, 504)]
    for code in (400, 408, 413, 500, 501):
        head, body = (folder / f"cnnray-{code}.http").read_bytes().split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.1 {code} ".encode()) and b"Content-Type: application/json" in head
        assert f"Content-Length: {len(body)}".encode() in head and list(json.loads(body)) == ["error"]
    # Run again (Ray reloads HAProxy on the same file): nothing more changes.
    r = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(cfg)], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0 and cfg.read_text() == rewritten, r.stdout + r.stderr


# --- a real `cnnray serve` -----------------------------------------------------------------------
def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of these processes."""
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            name = p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((pid, name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _names(pids: set[int]) -> dict[int, str]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # starts Ray or a server
def test_cnnray_serve_listens_on_loopback_only_and_sigterm_leaves_nothing_behind(tmp_path):
    import psutil

    ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    proc = spawn_cnnray(["serve", "--checkpoint", str(ck), "--name", "digits", "--port", str(port),
                         "--watch-s", "0", "--replicas", "1"], output=log)
    seen: set[int] = set()
    folder = None
    try:
        wait_http(url + "/healthz", proc, log, "cnnray serve", every_s=1)
        # Connection: close: this client keeps no idle connection (the drain no longer waits for
        # idle ones, tests/robustness/test_serve_shutdown.py checks that; here it is not the point).
        r = requests.post(f"{url}/predictions/digits", data=png(np.zeros((28, 28), np.uint8)),
                          headers={"Content-Type": "image/png", "Connection": "close"}, timeout=60)
        assert r.status_code == 200, r.text
        # HAProxy restarts on reloads: look until a snapshot of the process tree holds one
        # that listens on the serving port (a snapshot taken mid-restart may not).
        deadline = time.monotonic() + 30
        while True:
            seen = _tree(proc.pid)
            names = _names(seen)
            sockets = _listening(seen)
            if any("haproxy" in n for n in names.values()) and any(port == port_ for *_, port_ in sockets):
                break
            assert time.monotonic() < deadline, f"no HAProxy on port {port}: {sorted(names.items())} {sockets}"
            time.sleep(0.5)
        # HAProxy (serving port, stats page, metrics) listens on loopback alone.
        hap = [s for s in sockets if "haproxy" in s[1]]
        assert len(hap) >= 3 and all(s[2] == "127.0.0.1" for s in hap), hap
        folder = _haproxy_folder(proc.pid)
        assert folder is not None and folder.is_dir()
        # Nothing at all beyond loopback: Ray's processes, its agents and metrics endpoint,
        # the replicas' HTTP and gRPC servers.
        wide = [s for s in sockets if s[2] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert not wide, f"listening beyond loopback: {wide}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 120 s"
    assert code == 143, log_tail(log)  # 128 + SIGTERM, as a shell reports a signal
    assert "[cnnray] stopped (SIGTERM)" in log_tail(log)
    # Everything it started has ended (give Ray's own children a moment to be reaped).
    deadline = time.monotonic() + 30
    while (alive := [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]):
        if time.monotonic() > deadline:
            left = [(p, psutil.Process(p).name()) for p in alive if psutil.pid_exists(p)]
            pytest.fail(f"left running after SIGTERM: {left}")
        time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)
    assert folder is not None and not folder.exists(), "HAProxy's private folder was left behind"


# --- Ray's own `serve run` of jobs/configs/serve.yaml: fast ingress, and the store watched ----------
@pytest.mark.slow  # starts Ray or a server
def test_serve_run_of_the_shipped_config_swaps_in_new_store_versions_itself(tmp_path):
    """What a RayService runs (no `cnnray serve` beside it): each replica finds the new version."""
    import yaml

    from cnnray.store import export

    store = tmp_path / "store"
    export(save_model(tmp_path / "v1", "cnn", MNIST_INFO, seed=1), store, "digits")
    config = yaml.safe_load((REPO / "jobs" / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(model_store=str(store), replicas=1, watch_s=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve-run.log", "w+")
    # As the config's comment says to run it: with the fast ingress, from any directory.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnray.serve.ingress", "--", str(Path(sys.executable).parent / "serve"), "run",
         str(tmp_path / "serve.yaml")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    folder = None
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_tail(log)
            try:
                r = requests.get(url + "/v1/models", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "serve run did not come up\n" + log_tail(log)
            time.sleep(1)
        assert [(m["name"], m["version"]) for m in r.json()["models"]] == [("digits", 1)]
        folder = _haproxy_folder(proc.pid)
        assert folder is not None, "serve run is not behind the fast ingress (no HAProxy)"
        export(save_model(tmp_path / "v2", "cnn", MNIST_INFO, seed=2), store, "digits")
        deadline = time.monotonic() + 60
        while requests.get(url + "/v1/models", timeout=5).json()["models"][0]["version"] != 2:
            assert time.monotonic() < deadline, "version 2 was not picked up\n" + log_tail(log)
            time.sleep(0.5)
        r = requests.post(f"{url}/predictions/digits", data=png(np.zeros((28, 28), np.uint8)),
                          headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == 2, r.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    if folder is not None:
        from cnnray.serve.ingress import haproxy_processes

        assert not haproxy_processes(folder), "HAProxy left running after serve run ended"
        assert not folder.exists()


def _haproxy_folder(root: int) -> Path | None:
    """The private folder of the HAProxy running under process `root`, if any."""
    import psutil

    for pid in _tree(root):
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        if "-f" in cmd and any(a.startswith("/tmp/cnnray-hap-") for a in cmd):
            cfg = Path(cmd[cmd.index("-f") + 1])
            return cfg.parent.parent  # <folder>/<node id>/haproxy.cfg
    return None


def test_haproxy_socket_paths_fit(tmp_path):
    """HAProxy refuses socket paths over 97 bytes; Ray adds a 56-character node id folder."""
    from cnnray.serve.ingress import FastIngress, fast_ingress_env

    with pytest.raises(ValueError, match="too long"):
        fast_ingress_env(Path("/tmp") / ("x" * 40))
    with FastIngress(apply=False) as env:
        longest = max(len(v) for k, v in env.items() if k.endswith(("SOCKET_PATH",))) + 57
        assert longest <= 97
    # cluster/local.sh's folder: its head's temp dir (/tmp/cnnray-ray.XXXXXX) plus "/h".
    assert '--print-env "$temp_dir/h"' in (REPO / "cluster" / "local.sh").read_text()
    assert len("/tmp/cnnray-ray.XXXXXX/h") + 1 + 56 + len("/metrics.sock") <= 97


@pytest.mark.slow  # starts Ray or a server
def test_haproxy_answers_its_own_errors_readably(short_dir):
    """HAProxy as Ray configures it, through the wrapper: with no replica to answer, the client
    reads a JSON 500 (Ray's 502/503/504 mapping, cnnray's body); malformed HTTP gets a 400 that
    closes the connection (HAProxy 2.8 sends its built-in HTML there: README, "Fast ingress")."""
    import socket

    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    from cnnray.serve.ingress import fast_ingress_env

    env = fast_ingress_env(short_dir)
    port, dead = free_port(), free_port()  # nothing listens on `dead`: the replica is gone
    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=port), socket_path=str(short_dir / "a.sock"),
                        server_state_file=str(short_dir / "state"), server_state_base=str(short_dir),
                        stats_port=int(env["RAY_SERVE_HAPROXY_STATS_PORT"]),
                        metrics_port=int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]))
    backend = BackendConfig(name="cnnray", path_prefix="/", app_name="cnnray",
                            servers=[ServerConfig(name="replica", host="127.0.0.1", port=dead)])
    api = HAProxyApi(cfg=cfg, config_file_path=str(short_dir / "haproxy.cfg"), backend_configs={"cnnray": backend})
    api._generate_config_file_internal()
    proc = subprocess.Popen([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(short_dir / "haproxy.cfg")],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def exchange(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):  # HAProxy closes after these answers
                data += chunk
            return data

    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "HAProxy did not listen"
                time.sleep(0.1)
        answer = exchange(b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 500 ") and b"content-type: application/json" in head.lower(), answer
        assert "no replica could answer" in json.loads(body)["error"]
        head = exchange(b"GARBAGE\r\n\r\n").split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 400 ") and b"connection: close" in head
    finally:
        proc.terminate()
        proc.wait(30)
