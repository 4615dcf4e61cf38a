"""Start the serving app on Ray Serve the way `serve run config.yaml` does, and hot-swap models.

`cnnray serve` (and the tests) deploy the application as a Serve *config* (the same
structure as jobs/configs/serve.yaml), not with `serve.run(app)`: with a config, a change
of the deployment's user_config alone is applied in place through `reconfigure`, with no
replica restart, whereas every `serve.run` counts as new code and restarts the replicas.
`ServeRunner.refresh()` re-reads the model store and, when a model has a new version,
deploys the same config with the new user_config.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from cnnray.serve.defaults import APP_NAME, DEPLOYMENT
from cnnray.serve.engine import resolve, resolve_models, user_config_for
from cnnray.serve.schemas import ModelRef, ServeArgs

APP_IMPORT_PATH = "cnnray.serve.app:build_app"


class ServeError(RuntimeError):
    """The application could not be deployed or did not come up."""


def serve_config(
    args: ServeArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    user_config: dict[str, Any] | None = None,
    replicas: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """A Serve deploy config (ServeDeploySchema as plain data) running `build_app(args)`.

    `user_config` and `replicas` override the builder's choices for the deployment: changing
    only these is applied to the running app in place (reconfigure, or adding/removing
    replicas), while a change of `args` rebuilds the app and restarts its replicas."""
    app: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": APP_IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude_defaults=True),
    }
    if runtime_env:
        app["runtime_env"] = runtime_env
    override: dict[str, Any] = {}
    if user_config is not None:
        override["user_config"] = user_config
    if replicas is not None:
        override["num_replicas"] = replicas
    if override:
        app["deployments"] = [{"name": DEPLOYMENT, **override}]
    config = {"http_options": {"host": host, "port": port}, "applications": [app]}
    if grpc_port is not None:  # OIP v2 over gRPC (oip_grpc.py)
        from cnnray.serve.oip_grpc import grpc_options

        config["grpc_options"] = grpc_options(grpc_port)
    return config


class ServeRunner:
    """The serving app on the current (or a new local) Ray: start, refresh, stop."""

    def __init__(self, args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None) -> None:
        self.args, self.host, self.port, self.grpc_port = args, host, port, grpc_port
        self.models: dict[str, ModelRef] = {}
        self.problems: list[str] = []  # model-store entries skipped, reported in /v1/models
        self._bad: dict[str, Any] = {}  # store versions that failed verification, by their files' stamps
        self.replicas: int | None = None  # resolved at start ("auto": what the cluster fits)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 180.0, models: dict[str, ModelRef] | None = None) -> str:
        """Deploy and wait until every replica answers; returns the base URL. `models`:
        what `resolve_models(args)` already gave the caller (else resolved, and verified, here)."""
        from ray.serve._private import api as serve_private

        from cnnray.serve.app import auto_replicas

        self.models = models if models is not None else resolve_models(self.args)
        self.problems = resolve(self.args, self.models, self._bad).problems if self.args.model_store else []
        if self.replicas is None and self.args.autoscaling is None:  # autoscaling: Serve decides
            self.replicas = auto_replicas(self.args)
        # serve_start + deploy_apps is what `serve run config.yaml` does (ray/serve/scripts.py).
        grpc = {}
        if self.grpc_port is not None:
            from ray.serve.config import gRPCOptions

            from cnnray.serve.oip_grpc import grpc_options

            grpc = {"grpc_options": gRPCOptions(**grpc_options(self.grpc_port))}
        self._client = serve_private.serve_start(http_options={"host": self.host, "port": self.port}, **grpc)
        self._deploy()
        self.wait_running(timeout_s)
        self._wait_http(timeout_s)
        return self.url

    def _deploy(self) -> None:
        from ray.serve.schema import ServeDeploySchema

        env = _driver_runtime_env()
        user_config = user_config_for(self.args, self.models, self.problems)
        config = serve_config(self.args, self.host, self.port, user_config, self.replicas, env, self.grpc_port)
        self._client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)

    def scale(self, replicas: int) -> None:
        """Run `replicas` replicas; the running ones keep serving (no restart)."""
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.replicas = replicas
        self._deploy()

    def refresh(self) -> dict[str, ModelRef]:
        """Serve the newest usable version of every model in the store; returns what changed.

        Whatever is in the store, this keeps serving: a version that does not verify (still
        being copied, unreadable, corrupt) is skipped and listed in `self.problems`, which
        the replicas report in /v1/models. Only versions not being served are verified, and
        a failed one again only when its files change, so polling a store is cheap."""
        res = resolve(self.args, self.models, self._bad)
        changed = {n: r for n, r in res.models.items() if self.models.get(n) != r}
        if not changed and set(res.models) == set(self.models) and res.problems == self.problems:
            return {}
        self.models, self.problems = res.models, res.problems
        self._deploy()
        return changed

    def wait_running(self, timeout_s: float = 180.0) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP_NAME)
            status = app.status if app else None
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ServeError(f"the serving app failed to deploy: {app.message.strip().splitlines()[-1:]}")
            time.sleep(0.5)
        raise ServeError(f"the serving app is not running after {timeout_s:.0f} s (status {status})")

    def _wait_http(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"no answer from {self.url}/healthz after {timeout_s:.0f} s")
            time.sleep(0.3)

    def stop(self, shutdown_serve: bool = True) -> None:
        """Remove the app; with `shutdown_serve`, stop Serve's controller and proxies too."""
        from ray import serve

        if shutdown_serve:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)


def _driver_runtime_env() -> dict[str, Any] | None:
    """This driver's runtime_env, for the app. A config-deployed app does not inherit it, so
    under `ray job submit --working-dir .` (jobs/serve.py) the app's build task and replicas
    would lack the uploaded code; the job's env (its working_dir is a gcs:// URI by now)
    gives them the same. A plain local driver has none."""
    import ray

    env = ray.get_runtime_context().runtime_env
    return dict(env) if env else None
