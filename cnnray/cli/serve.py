"""`cnnray serve`: checkpoints behind an HTTP API on Ray Serve, until interrupted.

    cnnray serve --model-store runs/store [--port 8000] [--replicas 2] [--gpu]
    cnnray serve --checkpoint runs/x/ray/x/epoch-0003 --name mnist
    cnnray serve --model-store runs/store --print-config > serve.yaml   # for `serve deploy`

`serve` runs until interrupted (Ctrl-C or SIGTERM), then removes what it started. Every
`--watch-s` seconds it looks for new versions in the model store and swaps them in without
dropping requests. Bad input (no model, a broken checkpoint, a bad value) exits 2 with one
line before Ray starts. The serving itself is cnnray/serve/.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any


def add_parser(sub: Any) -> None:
    from cnnray.argtypes import TCP_PORT, Range
    from cnnray.serve import defaults as s

    p = sub.add_parser(
        "serve",
        help="serve checkpoints over HTTP with Ray Serve",
        description="Serve cnnray checkpoints over HTTP (KServe v1 and TorchServe-style APIs, "
        "a page at /, Prometheus metrics at /metrics) until interrupted.",
    )
    p.add_argument("--model-store", metavar="DIR", help="serve the newest version of every model in this store")
    p.add_argument("--checkpoint", metavar="PATH", help="serve one checkpoint folder directly (as version 1)")
    p.add_argument("--name", help="model name for --checkpoint (letters, digits, '.', '_', '-')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=TCP_PORT.argtype(int), default=8000, help="HTTP port; default 8000")
    p.add_argument("--replicas", type=_replicas, default="auto",
                   help="replicas of the deployment, or 'auto': the Ray cluster's CPUs divided by "
                        "--cpus-per-replica (or its GPUs, with --gpu), at least 1; HAProxy and Ray share "
                        "those cores (no core is held back); or MIN-MAX: autoscaling between MIN and MAX "
                        "by load (e.g. 1-4); default auto")
    p.add_argument("--upscale-delay-s", type=Range(0, 3600).argtype(float), default=None,
                   help="with --replicas MIN-MAX: seconds of load over the target before a replica is added; default 10")
    p.add_argument("--downscale-delay-s", type=Range(0, 86_400).argtype(float), default=None,
                   help="with --replicas MIN-MAX: seconds under the target before a replica is removed; default 60")
    p.add_argument("--grpc-port", type=TCP_PORT.argtype(int), default=None,
                   help="also serve OIP v2 over gRPC (inference.GRPCInferenceService) on this port; default off")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default=s.DEFAULT_RUNTIME,
                   help="what runs the forward pass: torch, or the checkpoint's graph exported to ONNX and run "
                        f"by ONNX Runtime (CPU; needs cnnray[onnx]); default {s.DEFAULT_RUNTIME}")
    p.add_argument("--cpus-per-replica", type=Range(0, 4096, lo_open=True).argtype(float), default=1.0, help="CPUs per replica (torch threads); default 1")
    p.add_argument("--max-batch-size", type=Range(1, 4096).argtype(int), default=s.MAX_BATCH_SIZE,
                   help=f"images per forward pass; default {s.MAX_BATCH_SIZE}")
    p.add_argument("--batch-wait-ms", type=Range(0, 10_000).argtype(float), default=s.BATCH_WAIT_S * 1000,
                   help=f"how long a batch waits to fill, milliseconds; default {s.BATCH_WAIT_S * 1000:g}")
    p.add_argument("--max-body-mb", type=Range(1 / 1024, 2**12).argtype(float), default=s.MAX_BODY_BYTES / 2**20,
                   help=f"largest request body, MiB; default {s.MAX_BODY_BYTES / 2**20:g}")
    p.add_argument("--max-instances", type=Range(1, 2**16).argtype(int), default=s.MAX_INSTANCES,
                   help=f"instances per :predict request; default {s.MAX_INSTANCES}")
    p.add_argument("--watch-s", type=Range(0, 86_400).argtype(float), default=5.0,
                   help="seconds between looks at the model store for new versions (0: never); default 5")
    p.add_argument("--ingress", choices=("fast", "proxy"), default="fast",
                   help="fast: HAProxy in front of replicas that answer HTTP themselves (Ray Serve's fast "
                        "ingress); proxy: Serve's Python HTTP proxy. For a local Ray only (a cluster's "
                        "environment decides); default fast")
    p.add_argument("--no-explain", action="store_true",
                   help="turn off POST /v1/models/{name}:explain (heat maps and response maps of an image); "
                        "the route then answers 403")
    p.add_argument("--address", help="Ray cluster to join (auto: the `ray start` on this machine); default $RAY_ADDRESS, else a new private local Ray")
    p.add_argument("--print-config", action="store_true",
                   help="print the Serve config YAML for `serve deploy` and exit (starts nothing)")
    p.set_defaults(func=cmd_serve)


def serve_args_from(args: argparse.Namespace):
    """Flags -> ServeArgs; every bad value is a ConfigError (exit 2, one line)."""
    from pydantic import ValidationError

    from cnnray.config import ConfigError
    from cnnray.serve.schemas import Limits, ServeArgs

    if bool(args.checkpoint) != bool(args.name):
        raise ConfigError("--checkpoint and --name go together: --checkpoint PATH --name NAME")
    if not args.model_store and not args.checkpoint:
        raise ConfigError("nothing to serve: pass --model-store DIR, or --checkpoint PATH --name NAME")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    if args.watch_s < 0:
        raise ConfigError(f"--watch-s {args.watch_s:g} must be 0 (off) or positive")
    if args.runtime == "onnxruntime":
        import importlib.util

        if args.gpu:
            raise ConfigError("--runtime onnxruntime runs on CPUs: with --gpu use --runtime torch")
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--runtime onnxruntime needs {', '.join(missing)}: pip install 'cnnray[onnx]'")
    autoscaling = _autoscaling_from(args)
    try:
        return ServeArgs(
            model_store=args.model_store,  # ServeArgs resolves paths (cnnray.paths)
            checkpoints={args.name: args.checkpoint} if args.checkpoint else {},
            replicas="auto" if autoscaling else args.replicas,
            autoscaling=autoscaling,
            gpu=args.gpu,
            cpus_per_replica=args.cpus_per_replica,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
            watch_s=args.watch_s,
            runtime=args.runtime,
            limits=Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_instances=args.max_instances),
            explain=not getattr(args, "no_explain", False),
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        raise ConfigError(f"{where}: {msg}") from None


def _autoscaling_from(args: argparse.Namespace) -> dict[str, Any] | None:
    """--replicas MIN-MAX and the delay flags -> ServeArgs.autoscaling (plain data)."""
    from cnnray.config import ConfigError

    delays = {k: v for k, v in (("upscale_delay_s", getattr(args, "upscale_delay_s", None)),
                                ("downscale_delay_s", getattr(args, "downscale_delay_s", None))) if v is not None}
    if not isinstance(args.replicas, tuple):
        if delays:
            raise ConfigError("--upscale-delay-s and --downscale-delay-s go with --replicas MIN-MAX")
        return None
    return {"min_replicas": args.replicas[0], "max_replicas": args.replicas[1], **delays}


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""

    signum = signal.SIGTERM


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from cnnray.config import ConfigError
    from cnnray.serve.engine import resolve_models
    from cnnray.serve.runner import ServeRunner, serve_config

    sargs = serve_args_from(args)
    models = resolve_models(sargs)  # bad store or checkpoint: exit 2 before Ray starts
    if args.print_config:
        import yaml

        print(yaml.safe_dump(serve_config(sargs, args.host, args.port, grpc_port=args.grpc_port), sort_keys=False), end="")
        return 0

    from cnnray.serve.ingress import FastIngress

    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not joined:  # what a local Ray cannot give is refused before it starts (exit 2)
        _check_fits_this_machine(sargs)
        _check_port_free(args.host, args.port)
        if args.grpc_port is not None:
            if args.grpc_port == args.port:
                raise ConfigError(f"--grpc-port {args.grpc_port} is also --port: choose another")
            _check_port_free(args.host, args.grpc_port)
    # Ray reads its settings when it is imported and when it starts: a local Ray gets the
    # fast ingress here, before `import ray`; a cluster we join has what its nodes' env says.
    # Both carry --grpc-port's gRPC on Ray 2.60: HAProxy forwards it to each replica's own gRPC
    # server (docs/serving-protocols.md, "gRPC and the fast ingress").
    ingress = FastIngress() if args.ingress == "fast" and not joined else None
    if ingress is not None:
        ingress.__enter__()
    if args.grpc_port is not None and not joined:
        from cnnray.serve.oip_grpc import grpc_env

        os.environ.update(grpc_env(sargs.limits.max_body_bytes))  # read by Ray's processes as they start

    import ray

    from cnnray.ray_start import init_ray, local_ray_alive

    runner = None
    stopped_by = 0  # the signal that stopped serving: the exit status is 128 + it
    previous = signal.getsignal(signal.SIGTERM)
    try:
        init_ray(args.address)
        if joined:
            _check_app_name_free()
        # After ray.init: Ray's core worker installs its own SIGTERM handler (which aborts).
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        runner = ServeRunner(sargs, host=args.host, port=args.port, grpc_port=args.grpc_port)
        url = runner.start(models=models)
        served = ", ".join(f"{n} (version {r.version})" for n, r in sorted(models.items()))
        print(f"[cnnray] serving {served} at {url}  (page {url}/, API {url}/v1/models, docs {url}/docs)", flush=True)
        if args.grpc_port is not None:
            print(f"[cnnray] OIP v2 gRPC (inference.GRPCInferenceService) at {args.host}:{args.grpc_port}", flush=True)
        scale = (f"{sargs.autoscaling.min_replicas}-{sargs.autoscaling.max_replicas} replicas (autoscaling)"
                 if sargs.autoscaling else f"{runner.replicas} replica(s)")
        print(f"[cnnray] {scale}, ingress: {_ingress_name(ingress, joined)}; "
              "press Ctrl-C to stop", flush=True)
        _print_problems(runner.problems, [])
        # Each replica also looks in the store every --watch-s seconds itself (app.py, for
        # `serve run`/RayService); here the deployed user_config follows the store too, so a
        # restarted replica starts on the newest version, and skipped entries are printed.
        while True:
            time.sleep(args.watch_s or 3600)
            if args.watch_s:
                before = list(runner.problems)
                try:
                    changed = runner.refresh()
                except Exception as e:  # whatever the store holds, serving goes on
                    print(f"[cnnray] model store not refreshed: {str(e).splitlines()[0]}", flush=True)
                    continue
                _print_problems(runner.problems, before)
                for name, ref in changed.items():
                    print(f"[cnnray] now serving {name} version {ref.version} ({ref.path})", flush=True)
    except (KeyboardInterrupt, _Stop) as e:
        from cnnray.interrupts import signal_number

        stopped_by = signal_number(e)  # _Stop's SIGTERM; the program's Interrupted (during Ray start-up); Ctrl-C
    finally:
        # A second Ctrl-C or SIGTERM while stopping must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stopped_by and ingress is not None and runner is not None:
            _drain(ingress, signal.Signals(stopped_by).name)
        elif stopped_by:
            print(f"[cnnray] stopping ({signal.Signals(stopped_by).name})", flush=True)
        try:
            # On a cluster we joined, remove our app only; a local Ray is ours to stop.
            if runner is not None and not joined and stopped_by == signal.SIGTERM and not local_ray_alive():
                # The SIGTERM reached Ray's processes too (sent to the process group): they have
                # stopped, and serve.shutdown() would wait 30 s for a controller that cannot answer.
                print("[cnnray] Ray's processes got the signal too and have stopped", flush=True)
            elif runner is not None:
                runner.stop(shutdown_serve=not joined)
        finally:
            try:
                if not joined:
                    ray.shutdown()
            finally:
                if ingress is not None:
                    ingress.close()  # and any HAProxy Ray left running
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, signal.default_int_handler)
    if stopped_by:
        print(f"[cnnray] stopped ({signal.Signals(stopped_by).name})", flush=True)
        return 128 + stopped_by  # 130 for Ctrl-C, 143 for SIGTERM: as a shell reports a signal
    return 0


def _check_app_name_free() -> None:
    """On a cluster we joined, an app of our name is someone else's (or an earlier job's):
    deploying would replace it and stopping would delete it. ConfigError instead."""
    from ray import serve

    from cnnray.config import ConfigError
    from cnnray.serve.defaults import APP_NAME

    if APP_NAME in serve.status().applications:  # empty where Serve has not started (starts nothing)
        raise ConfigError(f"the Ray cluster already serves an application named {APP_NAME!r}: stop it "
                          "(serve shutdown, or the job that deployed it) before serving there again")


def _drain(ingress: Any, name: str) -> None:
    """Stop accepting connections and finish the accepted requests before Serve stops
    (cnnray.serve.drain)."""
    from cnnray.serve.drain import DRAIN_TIMEOUT_S, soft_stop_haproxy

    print(f"[cnnray] stopping ({name}): no new connections; finishing the requests already accepted", flush=True)
    _, drained = soft_stop_haproxy(ingress.folder)
    if not drained:
        print(f"[cnnray] requests still running after {DRAIN_TIMEOUT_S:g} s are cut short", flush=True)


def _print_problems(problems: list[str], before: list[str]) -> None:
    for line in problems:
        if line not in before:
            print(f"[cnnray] model store: {line}", flush=True)


def _check_fits_this_machine(sargs: Any) -> None:
    """Explicit --replicas that this machine's CPUs (or GPUs) cannot hold would wait for
    resources forever on a local Ray: ConfigError instead."""
    from cnnray.config import ConfigError

    if sargs.autoscaling is not None:  # the most replicas autoscaling may start must fit
        sargs = sargs.model_copy(update={"replicas": sargs.autoscaling.max_replicas})
    if sargs.replicas == "auto":
        return
    if sargs.gpu:
        import torch

        have, need, what = torch.cuda.device_count(), sargs.replicas, "GPUs"
    else:
        from cnnray.ray_start import local_cpu_count

        have, need, what = local_cpu_count(), sargs.replicas * sargs.cpus_per_replica, "CPUs"
    if need > have:
        raise ConfigError(
            f"--replicas {sargs.replicas} need {need:g} {what} but this machine has {have}: "
            "lower --replicas (or --cpus-per-replica), or use --replicas auto"
        )


def _check_port_free(host: str, port: int) -> None:
    """ConfigError when something already listens on host:port (HAProxy or Serve's proxy
    would fail to bind it only after Ray has started). SO_REUSEADDR, as servers bind, so a
    port in TIME_WAIT still counts as free."""
    import socket

    from cnnray.config import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port)") from None


def _replicas(text: str) -> int | str | tuple[int, int]:
    """argparse type of --replicas: 'auto', a whole number in [1, 4096], or MIN-MAX."""
    from cnnray.argtypes import Range
    from cnnray.serve.autoscale import parse_range

    if text.strip().lower() == "auto":
        return "auto"
    try:
        span = parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if span is not None:
        return span
    try:
        return Range(1, 4096).argtype(int)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or auto)") from None


def _ingress_name(ingress: Any, joined: bool) -> str:
    if joined:
        return "the cluster's"
    return "fast (HAProxy, direct to replicas)" if ingress is not None else "Serve's HTTP proxy"
