"""The lean path of the HTTP API: the two inference routes answered without FastAPI's
middleware stack, router and parameter solving (api.py builds the app and its handlers)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


class LeanApp(FastAPI):
    """FastAPI, with the two inference routes (`POST /predictions/{name}` and
    `POST /v1/models/{name}:predict`) answered before FastAPI's middleware stack, router and
    parameter solving when `hot` is set. The routes stay registered with FastAPI (the OpenAPI
    document; every other method and path), and both ways call the same handler, so they
    answer alike. Measured with py-spy on a replica under load: that stack was ~6% of the
    replica's CPU per request (README, "Serving performance")."""

    hot: Any = None  # async (kind, name, scope, receive, send) -> None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.hot is not None and scope["type"] == "http":
            route = hot_route(scope)
            if route is not None:
                await self.hot(*route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def hot_route(scope: dict[str, Any]) -> tuple[str, str] | None:
    """("torchserve" | "kserve", model name) for a request that FastAPI's router would give
    to an inference route (the same methods, and a name of one or more characters without
    "/", as its `{name}` matches), else None."""
    method = scope.get("method")
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    if method in ("POST", "PUT") and path.startswith("/predictions/"):
        name = path[len("/predictions/"):]
        if name and "/" not in name:
            return "torchserve", name
    elif method == "POST" and path.startswith("/v1/models/") and path.endswith(":predict"):
        name = path[len("/v1/models/"):-len(":predict")]
        if name and "/" not in name:
            return "kserve", name
    return None
