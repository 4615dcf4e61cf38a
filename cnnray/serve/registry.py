"""Serving from an MLflow model registry: `--model-store models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    cnnray serve --model-store models:/digits@champion     # follows the alias
    cnnray serve --model-store models:/digits/3            # that version, always

The registry is the tracking server's ($MLFLOW_TRACKING_URI, or $MLFLOW_REGISTRY_URI),
read with the `mlflow` client (`cnnray[mlflow]`). A version's artifacts (a cnnray
checkpoint folder, as `cnnray register` and `cnnray tune --register` log it) are
downloaded once into a local cache ($XDG_CACHE_HOME/cnnray/registry, else
~/.cache/cnnray/registry), verified, and served like a model store's version: the served
model is NAME, its version the registry's version number. For an alias, each look at the
store (`--watch-s`) asks the registry where the alias points, so moving the alias (in the
MLflow UI, or by a registration that beats the champion) swaps the served model, with the
store's checks (a version that fails to load leaves the previous one serving).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnnray.checkpoint import CheckpointError, verify_checkpoint
from cnnray.config import ConfigError
from cnnray.store import check_name

SCHEME = "models:/"
# models:/NAME@ALIAS or models:/NAME/VERSION (MLflow's own forms, without a sub-path).
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[1-9][0-9]{0,8}))$")
CACHE_ENV = "XDG_CACHE_HOME"


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None
    version: int | None


def is_registry_uri(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SCHEME)


def parse_registry_uri(text: str) -> RegistryRef:
    """models:/NAME@ALIAS or models:/NAME/VERSION; ConfigError (one line) otherwise."""
    m = _URI.match(text)
    if not m:
        raise ConfigError(f"model store {text!r}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    check_name(m["name"])  # it becomes the served model's name (StoreError: one line)
    return RegistryRef(m["name"], m["alias"], int(m["version"]) if m["version"] else None)


def registry_uri_from_env() -> str | None:
    return os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI")


def follows_alias(store: str | None) -> bool:
    """Whether what a store names may move to any version (an alias), not only a newer one."""
    return is_registry_uri(store) and "@" in str(store)


@dataclass(frozen=True)
class RegistryVersion:
    """A registry version ready to serve: the served model's name, its verified checkpoint
    folder in the local cache, and the registry's version number."""

    name: str
    path: str
    version: int


def resolve_registry(store: str, registry_uri: str | None, serving: bool) -> tuple[RegistryVersion | None, list[str]]:
    """The version `store` (models:/...) names, downloaded and verified, and the problem
    lines. Before serving (`serving` false) a problem is a ConfigError: an unknown model
    name or alias, an unreachable registry, a version that is no cnnray checkpoint. While
    serving, the same problems give (None, [one line]): the caller keeps what it serves.
    (Plain values, not the engine's ModelRef: the engine and the schemas import this
    module, so it imports neither.)"""
    ref = parse_registry_uri(store)
    uri = registry_uri or registry_uri_from_env()
    try:
        if not uri:
            raise ConfigError(f"{store}: set MLFLOW_TRACKING_URI to the registry's tracking server")
        version = _lookup(uri, ref)
        path = _download(uri, ref.name, version)
    except (ConfigError, CheckpointError) as e:
        if not serving:
            raise ConfigError(str(e)) from None
        first = str(e).strip().splitlines()[0][:500]
        return None, [f"{store}: {first} (still serving what was loaded)"]
    return RegistryVersion(ref.name, str(path), version), []


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ModuleNotFoundError:
        raise ConfigError("serving from an MLflow registry needs its client: pip install 'cnnray[mlflow]'") from None
    # Few, short retries: a registry that does not answer must not stall a poll for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _lookup(uri: str, ref: RegistryRef) -> int:
    """The version number that `ref` names now; ConfigError naming what is missing."""
    client = _client(uri)
    try:
        if ref.alias is not None:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, str(ref.version))
    except Exception as e:  # MlflowException (RESOURCE_DOES_NOT_EXIST, ...) or the connection's
        code = getattr(e, "error_code", "")
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise ConfigError(f"model registry at {uri}: registered model {ref.name!r} has no {what}") from None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model registry at {uri} does not answer: {first}") from None
    return int(mv.version)


def cache_root(uri: str) -> Path:
    """Downloads of the registry at `uri`: one folder per registry (a hash of its URI)."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache") / "cnnray" / "registry"
    return base / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _download(uri: str, name: str, version: int) -> Path:
    """The verified checkpoint folder of `name` version `version`, downloaded once: into a
    hidden folder beside its place, verified, then renamed, so a half download is never used."""
    target = cache_root(uri) / name / str(version)
    if target.is_dir():
        try:
            verify_checkpoint(target)
            return target
        except CheckpointError:
            shutil.rmtree(target, ignore_errors=True)  # damaged since: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}-"))
    try:
        import mlflow.artifacts

        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp),
                                                tracking_uri=uri, registry_uri=uri)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model registry at {uri}: cannot download {name} version {version}: {first}") from None
        folder = _checkpoint_folder(tmp)
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            raise CheckpointError(f"{name} version {version} is not a cnnray checkpoint: {e}") from None
        try:
            folder.rename(target)
        except OSError:
            if not target.is_dir():  # another replica put it there first: that one stands
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_folder(root: Path) -> Path:
    """The folder holding meta.json in a download (the version's files, or one folder of them)."""
    if (root / "meta.json").exists():
        return root
    inner = [p for p in root.iterdir() if p.is_dir()]
    return inner[0] if len(inner) == 1 and (inner[0] / "meta.json").exists() else root
